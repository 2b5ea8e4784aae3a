"""accelerate: hf_fp8.Accelerator, the recipe from the environment, and `accelerate launch` (1 CPU process)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from llama_fixtures import tiny_llama

import hf_fp8
from hf_fp8.integrations.accelerate_plugin import config_from_environment

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"HF_FP8_RECIPE": "delayed"}, "dly:e4m3/e5m2,h16,max"),
        ({"HF_FP8_RECIPE": "full_bf16"}, "full-bf16"),
        ({"ACCELERATE_MIXED_PRECISION": "fp8"}, "ten:e4m3/e5m2"),
        (
            {
                "ACCELERATE_MIXED_PRECISION": "fp8",
                "ACCELERATE_FP8_FORMAT": "HYBRID",
                "ACCELERATE_FP8_AMAX_HISTORY_LEN": "32",
                "ACCELERATE_FP8_AMAX_COMPUTE_ALGO": "most_recent",
            },
            "dly:e4m3/e5m2,h32,most_recent",
        ),
        ({"ACCELERATE_MIXED_PRECISION": "fp8", "ACCELERATE_FP8_FORMAT": "E4M3"}, "ten:e4m3/e4m3"),
    ],
)
def test_recipe_from_environment(env, expected):
    cfg = config_from_environment(env)
    assert (cfg.short_str() if cfg else None) == expected


def test_bad_recipe_env():
    with pytest.raises(ValueError, match="HF_FP8_RECIPE"):
        config_from_environment({"HF_FP8_RECIPE": "fp4"})


def test_accelerator_converts_in_prepare_and_replaces_accelerate_fp8(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")  # accelerate's FP8 request is taken over
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built before conversion: still the same Parameters
    acc = hf_fp8.Accelerator(fp8_config=hf_fp8.Fp8Config(auto_filter=False, exclude=("lm_head",)), cpu=True)
    assert acc.mixed_precision == "bf16" and os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16"
    model, opt = acc.prepare(model, opt)
    assert isinstance(model.model.layers[0].mlp.up_proj, hf_fp8.Fp8Linear)
    assert acc.fp8_reports and len(acc.fp8_reports[0].converted) == 14
    ids = torch.randint(0, 512, (2, 16))
    acc.backward(model(input_ids=ids, labels=ids).loss)
    opt.step()


def _accelerate_launch(config: str, steps: int, env: dict[str, str]) -> str:
    """``accelerate launch --config_file examples/accelerate/<config>.yaml examples/finetune_accelerate.py``;
    returns its stdout after checking it exited cleanly."""
    out = subprocess.run(
        [
            shutil.which("accelerate"),
            "launch",
            "--config_file",
            str(ROOT / f"examples/accelerate/{config}.yaml"),
            str(ROOT / "examples/finetune_accelerate.py"),
            "--steps",
            str(steps),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate CLI is not on PATH")
def test_accelerate_launch_one_cpu_process():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "HF_FP8_"))}
    env["PYTHONPATH"] = str(ROOT / "tests") + os.pathsep + env.get("PYTHONPATH", "")
    stdout = _accelerate_launch("cpu", 8, env)
    assert "28 of 29 linear layers converted to FP8 (dly:e4m3/e5m2,h16,max)" in stdout
    m = re.search(r"loss: first ([0-9.]+), last ([0-9.]+); FP8 layers: (\d+)", stdout)
    assert m and float(m.group(2)) < float(m.group(1)) and m.group(3) == "28", stdout[-2000:]


def _launch_two_processes(config: str, steps: int = 4) -> re.Match:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "HF_FP8_", "FSDP_"))}
    env["OMP_NUM_THREADS"] = "1"  # two processes on a small CPU: no oversubscription
    stdout = _accelerate_launch(config, steps, env)
    m = re.search(
        r"loss: first ([0-9.]+), last ([0-9.]+); FP8 layers: (\d+); processes: (\d+) \((\w+), model wrapped as (\w+)\)",
        stdout,
    )
    assert m, stdout[-2000:]
    return m


def test_accelerate_launch_ddp_and_fsdp2_with_two_cpu_processes():
    # The yaml files are the GPU ones; without GPUs hf_fp8.Accelerator trains over gloo, and
    # applies fully_shard itself for fsdp_version 2 (accelerate ignores FSDP on CPUs).
    ddp = _launch_two_processes("ddp")
    fsdp = _launch_two_processes("fsdp2")
    assert ddp.group(4) == fsdp.group(4) == "2" and ddp.group(5) == fsdp.group(5) == "MULTI_CPU"
    assert ddp.group(6) == "DistributedDataParallel" and fsdp.group(6).startswith("FSDP")
    assert float(ddp.group(2)) < float(ddp.group(1)) and ddp.group(3) == fsdp.group(3) == "28"
    # same data shards, same global batch, same math: the two strategies agree (measured: equal
    # to 4 decimals); bound 1e-3 relative for reduction-order differences amplified by FP8 rounding
    assert abs(float(ddp.group(2)) - float(fsdp.group(2))) < 1e-3 * float(ddp.group(2))


def test_mixed_precision_fp8_in_code_works_like_the_launch_route():
    """``hf_fp8.Accelerator(mixed_precision="fp8")`` converts with the recipe the environment route
    would give (accelerate itself would ask for TransformerEngine or torchao), BF16 autocast for the
    rest; a TERecipeKwargs handler's settings carry over as ACCELERATE_FP8_* do."""
    import dataclasses

    accelerator = hf_fp8.Accelerator(mixed_precision="fp8", cpu=True)
    assert accelerator.fp8_config == hf_fp8.Fp8Config(recipe="tensorwise")
    assert accelerator.mixed_precision == "bf16"

    @dataclasses.dataclass
    class TERecipeKwargs:  # accelerate's class needs TransformerEngine installed even to be built
        fp8_format: str = "E4M3"
        amax_history_len: int = 32
        amax_compute_algo: str = "max"
        margin: int = 1

    accelerator = hf_fp8.Accelerator(mixed_precision="fp8", cpu=True, kwargs_handlers=[TERecipeKwargs()])
    assert accelerator.fp8_config == hf_fp8.Fp8Config(
        recipe="delayed", grad_format="e4m3", amax_history_len=32, amax_compute_algo="max", margin=1
    )
    accelerator.prepare(tiny_llama())
    (report,) = accelerator.fp8_reports  # prepare() converted the model with that recipe
    assert report.config_str.startswith("dly:e4m3/e4m3,h32")
