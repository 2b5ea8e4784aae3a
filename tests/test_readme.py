"""Every fenced Python example in README.md runs (on a CPU, in order, in one namespace, in a
temporary folder), except those whose first line says ``# sketch``; every ``hf_fp8.<name>`` the
README mentions exists."""

from __future__ import annotations

import re

import pytest
from helpers import ROOT

import hf_fp8

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_runnable_examples():
    runnable = [b for b in BLOCKS if not b.startswith("# sketch")]
    assert len(runnable) >= 5, "the quickstarts are runnable examples"


def test_readme_examples_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    try:
        for i, block in enumerate(BLOCKS):
            if block.startswith("# sketch"):
                continue
            AcceleratorState._reset_state(True)  # each quickstart as in a fresh process
            try:
                exec(compile(block, f"README.md python block {i}", "exec"), namespace)
            except Exception as e:  # name the block that failed
                raise AssertionError(f"README.md python block {i} failed: {type(e).__name__}: {e}\n{block}") from e
    finally:
        AcceleratorState._reset_state(True)
    out = capsys.readouterr().out
    assert "linear layers converted to FP8 (dly:" in out  # print(report) in the first quickstart


def test_every_hf_fp8_name_in_the_readme_exists():
    names = set(re.findall(r"\bhf_fp8\.([A-Za-z_][A-Za-z0-9_]*)", README))
    missing = sorted(n for n in names if not hasattr(hf_fp8, n))
    assert not missing, f"README.md mentions hf_fp8.{missing}, which do not exist"
    for name in names:
        assert name in hf_fp8.__all__ or name in ("optim", "monitor", "kernels", "integrations"), name
