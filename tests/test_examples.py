"""The examples run (short) on a CPU, as CI smoke tests."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

import hf_fp8

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture()
def examples_path():
    sys.path.insert(0, str(EXAMPLES))
    yield
    sys.path.remove(str(EXAMPLES))


def test_quickstart_runs(capsys, examples_path):
    quickstart = importlib.import_module("quickstart")
    losses = quickstart.main(["--steps", "6", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "224 of 225 linear layers converted to FP8" in out  # delayed on Llama-3-8B shapes: all but lm_head
    assert "step   loss fp8  loss fp32" in out
    assert len(losses["fp8"]) == 6 and all(v == v for v in losses["fp8"]), "no NaN"


def test_quickstart_compiled_equals_eager(capsys, examples_path):
    """--compile aot_eager: the FP8 model's losses are those of eager mode, bit for bit."""
    quickstart = importlib.import_module("quickstart")
    eager = quickstart.main(["--steps", "3", "--device", "cpu", "--recipe", "delayed"])
    compiled = quickstart.main(["--steps", "3", "--device", "cpu", "--recipe", "delayed", "--compile", "aot_eager"])
    capsys.readouterr()
    assert compiled["fp8"] == eager["fp8"] and compiled["ref"] == eager["ref"]
    torch._dynamo.reset()


def test_finetune_trainer_runs_and_saves_a_stock_checkpoint(tmp_path, capsys, examples_path):
    from transformers import AutoModelForCausalLM

    out = importlib.import_module("finetune_trainer").main(
        ["--output_dir", str(tmp_path), "--max_steps", "4", "--disable_tqdm", "true"]
    )
    text = capsys.readouterr().out
    assert (
        "converted to FP8 (dly:e4m3/e5m2,h16,max)" in text
        and f"saved a stock Hugging Face checkpoint to {tmp_path}" in text
    )
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert not any("fp8" in k for k in reloaded.state_dict())


def test_full_bf16_example(tmp_path, examples_path):
    from transformers import AutoModelForCausalLM

    out = importlib.import_module("full_bf16").main(
        ["--output_dir", str(tmp_path), "--max_steps", "3", "--disable_tqdm", "true"]
    )
    assert AutoModelForCausalLM.from_pretrained(out).model.embed_tokens.weight.dtype == torch.bfloat16


def test_lora_fp8_example(tmp_path, examples_path):
    out = Path(importlib.import_module("lora_fp8").main(["--output_dir", str(tmp_path), "--steps", "3"]))
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "merged" / "config.json").exists()


def test_monitor_fp8_example(tmp_path, capsys, examples_path):
    png = importlib.import_module("monitor_fp8").main(
        ["--output_dir", str(tmp_path), "--steps", "4", "--interval", "2"]
    )
    text = capsys.readouterr().out
    records = (tmp_path / "fp8_monitor.jsonl").read_text().splitlines()
    assert len(records) == 2 and "monitoring 28 layers every 2 steps" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote the curves to {png.resolve()}" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message; test_gpu.py runs it on a GPU")
def test_cuda_graph_example_says_it_needs_a_gpu(examples_path):
    example = importlib.import_module("cuda_graph_step")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        example.main(["--steps", "2"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_example_on_gpu(capsys, examples_path):
    """The graphed copy trains as the eager copy does (same kernels, same batches): 1e-3 relative
    on every step's loss covers cuDNN attention's backward summing in another order."""
    example = importlib.import_module("cuda_graph_step")
    losses = example.main(["--steps", "12"])
    assert "median step" in capsys.readouterr().out
    for a, b in zip(losses["eager"], losses["graph"], strict=True):
        assert abs(a - b) / abs(a) < 1e-3, losses


def test_deferred_adamw_example_trains_identically(capsys, examples_path):
    example = importlib.import_module("deferred_adamw")
    out = example.main(["--steps", "3", "--device", "cpu", "--hidden", "128", "--seq", "32", "--vocab", "256"])
    printed = capsys.readouterr().out
    assert out["same_losses"] and out["same_weights"], printed
    assert "losses identical: True; final weights identical: True" in printed


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo"])
def test_trl_example_runs_each_trainer(tmp_path, capsys, examples_path, kind):
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM

    trainer = importlib.import_module("trl_finetune").main(
        ["--trainer", kind, "--output_dir", str(tmp_path), "--max_steps", "2", "--disable_tqdm", "true"]
    )
    text = capsys.readouterr().out
    assert "converted to FP8 (dly:e4m3/e5m2,h16,max)" in text and f"{kind}: 2 steps" in text
    assert trainer.args.fp8 == "delayed" and type(trainer.args).__name__.startswith("Fp8")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any("fp8" in k for k in reloaded.state_dict())


@pytest.mark.parametrize("batching, model_type", [("padded", "llama"), ("packed", "qwen3"), ("padded", "mistral")])
def test_sft_example_runs_fp8_attention_on_padded_and_packed_batches(batching, model_type, tmp_path, examples_path):
    out = importlib.import_module("sft_fp8_attention").main(
        [
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "4",
            "--disable_tqdm",
            "true",
            "--use_cpu",
            "true",
            "--batching",
            batching,
            "--model_type",
            model_type,
            "--logging_steps",
            "1",
        ]  # fmt: skip
    )
    seen = [set(s) for s in out["coverage"].attention.values()]
    assert seen and all(s == {"fp8"} for s in seen), seen  # the kernel ran on every mask, no fallback
    assert len(out["losses"]) >= 1 and all(v == v for v in out["losses"])


def test_lora_published_fp8_example(tmp_path, examples_path):
    from transformers import AutoModelForCausalLM

    out = importlib.import_module("lora_published_fp8").main(["--output_dir", str(tmp_path), "--steps", "6"])
    assert out["losses"][-1] < out["losses"][0]
    merged = AutoModelForCausalLM.from_pretrained(out["merged"])  # stock transformers reads the merged model
    assert not any("fp8" in k or "lora" in k for k in merged.state_dict())
    fp8_model, _ = hf_fp8.from_pretrained(out["merged_fp8"])  # and the FP8 export loads again
    assert sum(isinstance(m, hf_fp8.FrozenFp8Linear) for m in fp8_model.modules()) == 28


def test_fsdp2_fp8_all_gather_example_trains_as_the_bf16_gather():
    """Two processes over gloo (torchrun): the FP8 gather's losses equal the BF16 gather's."""
    import os
    import subprocess
    import sys

    def run(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               str(EXAMPLES / "fsdp2_fp8_all_gather.py"), "--steps", "3", *extra]  # fmt: skip
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return [line for line in done.stdout.splitlines() if line.startswith(("step", "28 FP8"))]

    fp8, bf16 = run(), run("--no_fp8_all_gather")
    assert fp8[0] == "28 FP8 layers, 28 of them gathered in FP8 over 2 ranks"
    assert len(fp8) == 4 and fp8[1:] == bf16[1:]
