"""Checkpoints: stock HF save_pretrained from a converted model, and bit-exact Trainer resume."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from llama_fixtures import tiny_llama
from safetensors.torch import load_file
from test_trainer import _args, _Data, _losses

import hf_fp8


@pytest.mark.smoke
def test_save_pretrained_is_a_stock_checkpoint(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    stock_keys = set(model.state_dict())
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="delayed", auto_filter=False))
    model(input_ids=torch.randint(0, 512, (1, 8)))  # FP8 state exists now
    assert any(k.endswith("fp8_amax_history") for k in model.state_dict())  # still a buffer of the model
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) <= stock_keys and not any("fp8" in k for k in saved)
    assert all(v.dtype == torch.bfloat16 for v in saved.values())  # original dtype
    # a process that cannot import hf_fp8 loads it with stock transformers, with identical weights
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "hf_fp8" or name.startswith("hf_fp8."):
                    raise ImportError("hf_fp8 is hidden in this test")
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        torch.save({{k: v for k, v in m.state_dict().items()}}, {str(tmp_path / "reloaded.pt")!r})
        assert not any(k.startswith("hf_fp8") for k in sys.modules)
        print("ok", type(m).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok LlamaForCausalLM" in out.stdout, out.stderr[-2000:]
    reloaded = torch.load(tmp_path / "reloaded.pt")
    for k, v in saved.items():
        assert torch.equal(reloaded[k], v), k


@pytest.mark.smoke
def test_converted_model_loads_a_stock_checkpoint():
    stock = tiny_llama(seed=3)
    model = tiny_llama(seed=4)
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="delayed", auto_filter=False))
    result = model.load_state_dict(stock.state_dict(), strict=True)  # FP8 state is optional on load
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, stock.model.layers[0].mlp.up_proj.weight)


class _StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.mark.parametrize("mode", ["delayed", "delayed_bf16", "full_bf16", "delayed_stock_trainer"])
def test_resume_is_bit_exact(tmp_path, mode):
    """8 steps straight vs 4 steps, checkpoint, new Trainer resumed: steps 5-8 give identical losses.
    Exercises the delayed-scaling state file and hf_fp8's AdamW states with their rounding RNG
    (FP32 moments in full-BF16; BF16 moments, stochastically rounded, for BF16 parameters under --fp8)."""
    kw = dict(full_bf16=True) if mode == "full_bf16" else dict(fp8="delayed", fp8_auto_filter=False)
    stock = mode == "delayed_stock_trainer"

    def trainer(model, args, callbacks=()):
        if stock:  # transformers.Trainer + Fp8Callback saves and restores the FP8 state too
            return transformers.Trainer(
                model=model, args=args, train_dataset=_Data(), callbacks=[hf_fp8.Fp8Callback(), *callbacks]
            )
        return hf_fp8.Trainer(model=model, args=args, train_dataset=_Data(), callbacks=list(callbacks))

    def build(out, **extra):
        if mode in ("full_bf16", "delayed_bf16"):
            with hf_fp8.set_default_dtype(torch.bfloat16):
                model = tiny_llama()
        else:
            model = tiny_llama()
        args = _args(out, max_steps=8, save_strategy="steps", save_steps=4, **kw, **extra)
        return model, args

    model, args = build(tmp_path / "a")
    straight = trainer(model, args)
    straight.train()
    losses_a = _losses(straight)

    model, args = build(tmp_path / "b")
    first = trainer(model, args, [_StopAt(4)])
    first.train()
    ckpt = tmp_path / "b" / "checkpoint-4"
    assert (ckpt / "model.safetensors").exists()
    if mode != "full_bf16":
        assert (ckpt / "hf_fp8_state.safetensors").exists()
    model, args = build(tmp_path / "b")
    second = trainer(model, args)
    second.train(resume_from_checkpoint=str(ckpt))
    losses_b = _losses(second)
    assert len(losses_a) == 8 and len(losses_b) >= 4
    assert losses_b[-4:] == losses_a[-4:], (losses_a, losses_b)
