"""Full-BF16 mode: Fp8Config(recipe=None) and set_default_dtype."""

from __future__ import annotations

import pytest
import torch
from llama_fixtures import tiny_llama

import hf_fp8


def test_full_bf16_model_end_to_end():
    with hf_fp8.set_default_dtype(torch.bfloat16):
        model = tiny_llama()
    assert torch.get_default_dtype() == torch.float32  # restored
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    report = hf_fp8.convert(model, hf_fp8.Fp8Config(recipe=None))
    assert report.converted == [] and report.config_str == "full-bf16"
    assert report.rope.startswith("FP32 rotation") and report.loss.startswith("FP32")
    opt = hf_fp8.optim.AdamW(model.parameters(), lr=1e-3, full_bf16=True)
    ids = torch.randint(0, 512, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())
    opt.step()
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def test_full_bf16_conflicts():
    with pytest.raises(ValueError, match="float16"):
        hf_fp8.convert(tiny_llama().half(), hf_fp8.Fp8Config(recipe=None))
    with pytest.warns(UserWarning, match="not full-BF16"):
        hf_fp8.convert(tiny_llama(), hf_fp8.Fp8Config(recipe=None))
    with pytest.raises(ValueError, match="grad_format: must be None"):
        hf_fp8.Fp8Config(recipe=None, grad_format="e5m2")
    with pytest.raises(ValueError, match="full-BF16"):
        hf_fp8.Fp8Linear(16, 16, config=hf_fp8.Fp8Config(recipe=None))
    with pytest.raises(TypeError, match="floating-point"):
        with hf_fp8.set_default_dtype(torch.int32):
            pass
    assert hf_fp8.Fp8Config.from_json(hf_fp8.Fp8Config(recipe=None).to_json()).full_bf16
