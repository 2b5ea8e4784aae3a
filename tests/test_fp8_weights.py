"""FP8-only frozen base weights (Fp8Config(fp8_weights=True)): storage, numerics, dtype moves,
checkpoints, and PEFT LoRA on top (train, merge/unmerge, adapter save/load)."""

from __future__ import annotations

import pytest
import torch
from llama_fixtures import tiny_llama

import hf_fp8

CFG = hf_fp8.Fp8Config(auto_filter=False, exclude=("lm_head",), fp8_weights=True)


def _layer_pair(dtype=torch.bfloat16, recipe="tensorwise"):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True, dtype=dtype)
    lin.weight.requires_grad_(False)
    dynamic = hf_fp8.Fp8Linear.from_linear(lin, hf_fp8.Fp8Config(recipe=recipe))
    lin2 = torch.nn.Linear(64, 48, bias=True, dtype=dtype)
    lin2.load_state_dict(lin.state_dict())
    lin2.weight.requires_grad_(False)
    stored = hf_fp8.Fp8Linear.from_linear(lin2, hf_fp8.Fp8Config(recipe=recipe, fp8_weights=True))
    stored.store_weight_in_fp8()
    return dynamic, stored


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_weight_gives_the_same_numerics_as_quantizing_every_step(recipe):
    dynamic, stored = _layer_pair(recipe=recipe)
    assert stored.weight.dtype == torch.float8_e4m3fn and stored.weight.element_size() == 1
    assert not stored.weight.requires_grad and stored.compute_dtype == torch.bfloat16
    for step in range(2):  # two steps: the delayed recipe's second step reads its history
        x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = dynamic(xa), stored(xb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        # the stored codes and scale are exactly what the per-tensor cast computes from the
        # same frozen weight, so outputs and input gradients are bit-identical
        assert torch.equal(ya, yb), step
        assert torch.equal(xa.grad, xb.grad), step
        assert torch.equal(dynamic.bias.grad, stored.bias.grad)


def test_dense_weight_is_the_dequantized_codes_within_fp8_rounding():
    dynamic, stored = _layer_pair(dtype=torch.float32)
    w = dynamic.weight
    dense = stored.dense_weight()
    assert dense.dtype == torch.float32
    # E4M3 keeps 3 mantissa bits: round-to-nearest error <= 2^-4 relative for normal values,
    # plus the absolute subnormal step (2^-9 / scale) near zero
    scale = stored.fp8_weight_scale_inv.item()
    assert ((dense - w).abs() <= w.abs() * 2**-4 + 2**-10 * scale).all()


def test_dtype_moves_keep_the_codes_and_follow_the_compute_dtype():
    _, stored = _layer_pair()
    codes = stored.weight.detach().clone()
    for cast, dtype in ((lambda m: m.to(torch.float32), torch.float32), (lambda m: m.half(), torch.float16)):
        cast(stored)
        assert stored.weight.dtype == torch.float8_e4m3fn and torch.equal(
            stored.weight.view(torch.uint8), codes.view(torch.uint8)
        )
        assert stored.compute_dtype == dtype
        assert stored.fp8_weight_scale_inv.dtype == torch.float32
        assert stored.dense_weight().dtype == dtype


def test_state_dict_is_stock_and_round_trips_bit_exactly():
    _, stored = _layer_pair()
    sd = stored.state_dict()
    assert set(sd) == {"weight", "bias"} and sd["weight"].dtype == torch.bfloat16
    codes = stored.weight.detach().clone()
    scale = stored.fp8_weight_scale_inv.clone()
    stored.load_state_dict(sd)  # our own dequantized weight: the codes and scale are kept exactly
    assert torch.equal(stored.weight.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(stored.fp8_weight_scale_inv, scale)
    other = {"weight": torch.randn(48, 64, dtype=torch.bfloat16) * 3, "bias": sd["bias"]}
    stored.load_state_dict(other)  # a different checkpoint is quantized on load
    assert not torch.equal(stored.fp8_weight_scale_inv, scale)
    rel = (stored.dense_weight().float() - other["weight"].float()).norm() / other["weight"].float().norm()
    assert rel < 0.05  # E4M3 rounding, ~2-3% relative in norm for Gaussian values
    with pytest.raises(RuntimeError, match="size mismatch"):
        stored.load_state_dict({"weight": torch.randn(16, 64, dtype=torch.bfloat16), "bias": sd["bias"]})


def test_convert_stores_fp8_weights_and_revert_dequantizes():
    model = tiny_llama().to(torch.bfloat16)
    bf16_bytes = sum(
        m.weight.numel() * 2 for m in model.modules() if type(m) is torch.nn.Linear and m is not model.lm_head
    )
    report = hf_fp8.convert(model, CFG)
    fp8_layers = [m for m in model.modules() if isinstance(m, hf_fp8.Fp8Linear)]
    assert len(fp8_layers) == len(report.converted) == 14 and all(m.has_fp8_weight for m in fp8_layers)
    fp8_bytes = sum(m.weight.numel() * m.weight.element_size() for m in fp8_layers)
    assert fp8_bytes * 2 == bf16_bytes  # half the base-weight memory of the converted layers
    assert "fp8(frozen)" in repr(fp8_layers[0])
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    hf_fp8.revert(model)
    lin = model.model.layers[0].mlp.up_proj
    assert type(lin) is torch.nn.Linear and lin.weight.dtype == torch.bfloat16 and not lin.weight.requires_grad
    with torch.no_grad():
        after = model(input_ids=ids).logits  # now BF16 matmuls on the dequantized weights
    assert (after.float() - before.float()).abs().max() < 0.1 * before.float().abs().max()


def test_config_rules():
    with pytest.raises(ValueError, match="scaled per column"):
        hf_fp8.Fp8Config(recipe="rowwise", fp8_weights=True)
    with pytest.raises(ValueError, match="full-BF16"):
        hf_fp8.Fp8Config(recipe=None, fp8_weights=True)
    assert hf_fp8.Fp8Config(fp8_weights=True).short_str().endswith(",fp8_weights")
    assert hf_fp8.Fp8Config.from_json(CFG.to_json()) == CFG


def test_save_pretrained_of_fp8_weights_model_loads_in_stock_transformers(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_llama().to(torch.bfloat16)
    hf_fp8.convert(model, CFG)
    model.save_pretrained(tmp_path)
    stock = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, m in model.named_modules():
        if isinstance(m, hf_fp8.Fp8Linear):
            assert torch.equal(stock.get_submodule(name).weight, m.dense_weight())


# ---- PEFT LoRA over FP8-only base weights ------------------------------------------------
peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _lora(seed=0):
    model = tiny_llama(seed).to(torch.bfloat16)
    hf_fp8.convert(model, CFG)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(model, cfg)


def test_lora_on_fp8_weights_trains_only_the_adapters():
    from hf_fp8.integrations.lora import Fp8LoraLinear

    pm = _lora()
    layer = pm.base_model.model.model.layers[0].mlp.up_proj
    assert type(layer) is Fp8LoraLinear and layer.base_layer.has_fp8_weight
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT keeps adapters FP32
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 512, (4, 16))
    losses = []
    for _ in range(8):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9, losses
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert layer.base_layer.weight.dtype == torch.float8_e4m3fn


def test_lora_merge_is_dequantized_base_plus_delta_and_unmerge_restores_codes():
    pm = _lora()
    layer = pm.base_model.model.model.layers[1].self_attn.v_proj
    base = layer.base_layer
    codes = base.weight.detach().clone()
    expected = (base.dense_weight(torch.float32) + layer.get_delta_weight("default").float()).to(torch.bfloat16)
    layer.merge()
    assert base.weight.dtype == torch.bfloat16 and torch.equal(base.weight, expected)  # one rounding
    layer.unmerge()
    assert torch.equal(base.weight.view(torch.uint8), codes.view(torch.uint8))
    merged = pm.merge_and_unload()
    w = merged.model.layers[1].self_attn.v_proj.weight
    assert w.dtype == torch.bfloat16 and torch.equal(w, expected)


def test_lora_adapters_save_and_load_over_fp8_weights(tmp_path):
    pm = _lora()
    pm.save_pretrained(tmp_path)
    fresh = tiny_llama().to(torch.bfloat16)
    hf_fp8.convert(fresh, CFG)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, pm(input_ids=ids).logits)


def test_save_fp8_of_fp8_weights_model_round_trips(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    hf_fp8.convert(model, CFG)
    hf_fp8.save_fp8(model, tmp_path)
    loaded, _ = hf_fp8.load_fp8(tmp_path)
    for name, m in model.named_modules():
        if isinstance(m, hf_fp8.Fp8Linear):
            ref = m.dense_weight().float()
            got = loaded.get_submodule(name).weight.float()
            # 128x128-block requantization of already-FP8 values: at most one E4M3 step apart
            assert ((got - ref).abs() <= ref.abs() * 2**-3 + 1e-6).all(), name
