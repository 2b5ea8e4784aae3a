#!/usr/bin/env bash
# One entry point for newcomers and CI. It creates a venv on first use (a CPU build of torch,
# torch==2.13.0, unless the Python it finds already has torch), installs hf_fp8 into it, then
# runs a task:
#   bash scripts/dev.sh demo [args]   the main job: examples/finetune_trainer.py (FP8 fine-tuning with the HF Trainer)
#   bash scripts/dev.sh test [args]   the CPU test suite on the newest releases pyproject admits: python -m pytest [args]
#   bash scripts/dev.sh lower [args]  the smoke tests (pytest -m smoke) on pyproject's lower bounds, in .venv-lower
set -euo pipefail
cd "$(dirname "$0")/.."
task=${1:-}
[ $# -gt 0 ] && shift
case "$task" in
  demo|test) venv=${HF_FP8_VENV:-.venv} ;;
  lower) venv=${HF_FP8_LOWER_VENV:-.venv-lower} ;;
  *) echo "usage: bash scripts/dev.sh demo|test|lower [args...]" >&2; exit 2 ;;
esac

if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv" >&2
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
# torch first, pinned, so that nothing later pulls a multi-GB CUDA build on a CPU-only machine.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
stamp="$venv/.hf_fp8-installed-$(cat pyproject.toml scripts/lower_bounds.py | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  if [ "$task" = lower ]; then
    python scripts/lower_bounds.py > "$venv/constraints.txt"
    echo "lower bounds: $(tr '\n' ' ' < "$venv/constraints.txt")" >&2
    pip install -q -c "$venv/constraints.txt" -e ".[train]" pytest
  else
    pip install -q -e ".[dev]"
  fi
  touch "$stamp"
fi

case "$task" in
  demo) exec python examples/finetune_trainer.py "$@" ;;
  test) exec python -m pytest "$@" ;;
  lower)
    python - <<'PY'
import importlib.metadata as md
print("versions:", ", ".join(f"{d} {md.version(d)}" for d in ("torch", "triton", "transformers", "accelerate", "peft", "safetensors")))
PY
    exec python -m pytest -m "smoke and not gpu and not slow" "$@" ;;
esac
