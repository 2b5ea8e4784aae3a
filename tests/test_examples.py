"""The examples run (short) on a CPU, as CI smoke tests."""

from __future__ import annotations

import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_runs(capsys):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import quickstart
    finally:
        sys.path.remove(str(EXAMPLES))
    losses = quickstart.main(["--steps", "6", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "96 of 225 linear layers converted to FP8" in out  # rowwise on Llama-3-8B shapes: the MLPs
    assert "step   loss fp8  loss fp32" in out
    assert len(losses["fp8"]) == 6 and all(v == v for v in losses["fp8"]), "no NaN"
