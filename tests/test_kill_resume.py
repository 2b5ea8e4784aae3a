"""kill -9 and resume: a run killed by SIGKILL after its last checkpoint and resumed from it ends
with the same weights and FP8 state, bit for bit, as the run that never stopped. Each phase runs
in its own process (tests/kill_resume_worker.py), so nothing survives the kill but the files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "kill_resume_worker.py"


def _run(mode, phase, out):
    return subprocess.run([sys.executable, str(WORKER), mode, phase, str(out)], capture_output=True, text=True)


@pytest.mark.parametrize(
    "mode",
    [
        "delayed_bf16",  # the most state: amax histories, BF16 moments, the stochastic rounding's step key
        pytest.param("delayed", marks=pytest.mark.slow),
        pytest.param("full_bf16", marks=pytest.mark.slow),
    ],
)
def test_kill_9_and_resume_is_bit_exact(tmp_path, mode):
    straight = _run(mode, "straight", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed = _run(mode, "killed", tmp_path / "run")
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    assert (tmp_path / "run" / "checkpoint-4").is_dir() and not (tmp_path / "run" / "final.pt").exists()
    assert (tmp_path / "run" / "checkpoint-4" / "hf_fp8_state.safetensors").exists() or mode == "full_bf16"

    resumed = _run(mode, "resume", tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    want = torch.load(tmp_path / "straight" / "final.pt")
    got = torch.load(tmp_path / "run" / "final.pt")
    assert want.keys() == got.keys()
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ after kill -9 + resume, e.g. {differ[:3]}"
    assert any("amax" in k or "scale" in k for k in want) or mode == "full_bf16"  # FP8 state compared too
