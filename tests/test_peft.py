"""PEFT LoRA on FP8 layers: adapters wrap Fp8Linear, stay high precision, train alone, merge, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from llama_fixtures import tiny_llama

import hf_fp8

peft = pytest.importorskip("peft")


def _lora_model(convert_first=True):
    model = tiny_llama()
    if convert_first:
        hf_fp8.convert(model, hf_fp8.Fp8Config(auto_filter=False, exclude=("lm_head",)))
    cfg = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,
    )  # nonzero B: the delta is visible
    return peft.get_peft_model(model, cfg)


def test_lora_wraps_fp8_layers_and_only_adapters_learn():
    pm = _lora_model()
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, hf_fp8.Fp8Linear)
    assert type(layer.lora_A["default"]) is torch.nn.Linear  # adapters are never converted
    assert layer.lora_A["default"].weight.dtype == torch.float32
    ids = torch.randint(0, 512, (2, 16))
    pm(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    # converting after get_peft_model leaves the adapters alone too
    report = hf_fp8.convert(_lora_model(convert_first=False), hf_fp8.Fp8Config(auto_filter=False))
    assert any("lora_A" in d.name and d.reason.startswith("LoRA adapter") for d in report.decisions)


def test_merge_and_unload_equals_base_plus_delta():
    pm = _lora_model()
    layer = pm.base_model.model.model.layers[0].mlp.up_proj
    base = layer.base_layer.weight.detach().clone()
    delta = layer.get_delta_weight("default").detach()
    merged = pm.merge_and_unload()
    w = merged.model.layers[0].mlp.up_proj.weight
    assert torch.allclose(w, base + delta, rtol=0, atol=1e-6)
    assert isinstance(merged.model.layers[0].mlp.up_proj, hf_fp8.Fp8Linear)


@pytest.mark.smoke
def test_adapters_save_and_load_with_peft(tmp_path):
    pm = _lora_model()
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    fresh = tiny_llama()
    hf_fp8.convert(fresh, hf_fp8.Fp8Config(auto_filter=False, exclude=("lm_head",)))
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, copy.deepcopy(pm)(input_ids=ids).logits, atol=1e-5)
