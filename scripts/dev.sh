#!/usr/bin/env bash
# One entry point for newcomers and CI. It creates .venv on first use (a CPU build of torch,
# torch==2.13.0, unless the Python it finds already has torch), installs hf_fp8 with its dev
# extras, then runs a task:
#   bash scripts/dev.sh demo [args]   the main job: examples/finetune_trainer.py (FP8 fine-tuning with the HF Trainer)
#   bash scripts/dev.sh test [args]   the CPU test suite: python -m pytest [args]
set -euo pipefail
cd "$(dirname "$0")/.."
task=${1:-}
[ $# -gt 0 ] && shift
case "$task" in
  demo|test) ;;
  *) echo "usage: bash scripts/dev.sh demo|test [args...]" >&2; exit 2 ;;
esac

venv=${HF_FP8_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv" >&2
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
# torch first, pinned, so that nothing later pulls a multi-GB CUDA build on a CPU-only machine.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
stamp="$venv/.hf_fp8-installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  pip install -q -e ".[dev]"
  touch "$stamp"
fi

case "$task" in
  demo) exec python examples/finetune_trainer.py "$@" ;;
  test) exec python -m pytest "$@" ;;
esac
