"""Published FP8 checkpoints (transformers' fine-grained format with any block shape, sharded;
compressed-tensors per tensor, per channel, per block) load with their FP8 codes and scales kept
as the frozen weights, compute exactly what their dequantized weights compute, and LoRA-train."""

from __future__ import annotations

import json

import pytest
import torch
from llama_fixtures import tiny_family
from safetensors.torch import save_file

import hf_fp8
from hf_fp8.frozen_fp8 import FrozenFp8Linear, dequantize

peft = pytest.importorskip("peft")

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantize(w: torch.Tensor, granularity, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-made FP8 codes and scales of ``w`` at one granularity: 'tensor', 'channel' or a block
    (rows, cols). The scales are not powers of two (as real checkpoints' are not)."""
    N, K = w.shape
    a = w.float().abs()
    if granularity == "tensor":
        scale = a.amax() / 448.0
    elif granularity == "channel":
        scale = a.amax(dim=1, keepdim=True) / 448.0
    else:
        bm, bn = granularity
        nb, kb = -(-N // bm), -(-K // bn)
        padded = torch.zeros(nb * bm, kb * bn)
        padded[:N, :K] = a
        scale = padded.view(nb, bm, kb, bn).amax(dim=(1, 3)) / 448.0
    scale = scale * (1 + 0.01 * torch.rand(scale.shape, generator=generator))  # not the amax exactly
    codes = (w.float() / _expand(scale, granularity, N, K)).to(torch.float8_e4m3fn)
    return codes, scale.float()


def _expand(scale, granularity, N, K):
    if granularity in ("tensor", "channel"):
        return scale
    bm, bn = granularity
    return scale.repeat_interleave(bm, 0)[:N].repeat_interleave(bn, 1)[:, :K]


def _write_checkpoint(tmp_path, model, fmt: str, granularity, ignore=(), shards: int = 1) -> dict:
    """Write ``model`` as a published FP8 checkpoint; returns {module name: (codes, scale)}."""
    g = torch.Generator().manual_seed(0)
    tensors, quantized = {}, {}
    for name, value in model.state_dict().items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module and module.rpartition(".")[2] in LINEARS and module not in ignore:
            codes, scale = _quantize(value, granularity, g)
            tensors[name] = codes
            tensors[f"{module}.{'weight_scale_inv' if fmt == 'fp8' else 'weight_scale'}"] = scale
            quantized[module] = (codes, scale)
        else:
            tensors[name] = value.to(torch.bfloat16).contiguous()
    config = model.config.to_dict()
    if fmt == "fp8":
        config["quantization_config"] = {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": None if isinstance(granularity, str) else list(granularity),
            "modules_to_not_convert": ["lm_head", *ignore],
        }
    else:
        strategy = granularity if isinstance(granularity, str) else "block"
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False}
        if strategy == "block":
            weights["block_structure"] = list(granularity)
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}},
            "ignore": ["lm_head", *ignore],
        }
    (tmp_path / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, tmp_path / "model.safetensors")
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k] for k in part}, tmp_path / file)
            weight_map.update({k: file for k in part})
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return quantized


CASES = {
    "fp8 blocks 128x128": ("fp8", (128, 128), 1),
    "fp8 blocks 32x64, sharded": ("fp8", (32, 64), 3),
    "fp8 blocks 1x128": ("fp8", (1, 128), 1),
    "fp8 per tensor": ("fp8", "tensor", 1),
    "compressed-tensors per channel": ("compressed-tensors", "channel", 1),
    "compressed-tensors per tensor": ("compressed-tensors", "tensor", 2),
    "compressed-tensors blocks 64x64": ("compressed-tensors", (64, 64), 1),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_published_checkpoint_loads_its_codes_and_computes_the_dequantized_model(case, tmp_path):
    fmt, granularity, shards = case
    # hidden 192: dims that 128 does not divide (partial blocks); one module left unquantized
    src = tiny_family(
        "qwen2", hidden_size=192, intermediate_size=320, num_attention_heads=3, num_key_value_heads=1, head_dim=64
    )
    ignore = ("model.layers.1.mlp.down_proj",)
    quantized = _write_checkpoint(tmp_path, src, fmt, granularity, ignore=ignore, shards=shards)
    model, report = hf_fp8.from_pretrained(tmp_path, dtype=torch.float32)
    assert any("13 linear layers keep the checkpoint's FP8 codes" in n for n in report.notes)
    block = None if isinstance(granularity, str) else granularity
    for name, (codes, scale) in quantized.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, FrozenFp8Linear) and not layer.weight.requires_grad
        assert torch.equal(layer.weight.view(torch.uint8), codes.view(torch.uint8))  # the stored codes, no copy made
        assert layer.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(layer.dense_weight(torch.float32), dequantize(codes, scale, block, torch.float32))
    assert type(model.get_submodule(ignore[0])) is torch.nn.Linear  # the ignore list: as it was
    assert torch.equal(
        model.get_submodule(ignore[0]).weight, src.get_submodule(ignore[0]).weight.to(torch.bfloat16).float()
    )
    # the model computes what the same architecture with the dequantized weights computes
    ref = tiny_family(
        "qwen2", hidden_size=192, intermediate_size=320, num_attention_heads=3, num_key_value_heads=1, head_dim=64
    )
    dense = {k: v.float() for k, v in model.state_dict().items()}  # state_dict: dequantized weights
    ref.load_state_dict(dense)
    ids = torch.randint(1, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-5  # FP32 sums in another order


def test_lora_trains_on_a_block_fp8_checkpoint_with_exact_gradients_and_merges(tmp_path):
    src = tiny_family(
        "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64
    )
    _write_checkpoint(tmp_path, src, "fp8", (128, 128))
    model, _ = hf_fp8.from_pretrained(tmp_path, hf_fp8.Fp8Config(exclude=("*",)), dtype=torch.float32)
    dense = _dense_copy(model, src)  # the same architecture with the dequantized weights
    cfg = peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    base = pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base, FrozenFp8Linear)
    # gradients against a float64 model with the dequantized weights and the same adapters
    ref = peft.get_peft_model(dense, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"])).double()
    ref.load_state_dict({k: v.double() for k, v in pm.state_dict().items()}, strict=False)
    ids = torch.randint(1, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    pm(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert grads and grads.keys() == ref_grads.keys() and all("lora_" in n for n in grads)
    for n in grads:  # FP32 against float64 on the same (dequantized) weights
        assert ((grads[n].double() - ref_grads[n]).norm() / ref_grads[n].norm()).item() < 1e-4, n
    pm.zero_grad()
    losses = _train_adapters(pm, ids, 20)
    assert losses[-1] < losses[0] - 0.5, losses  # it learns
    cov = hf_fp8.fp8_coverage(pm)  # the frozen layers say how they compute
    assert len(cov.dequantized) == 14 and "14 frozen FP8-weight layers" in cov.summary()
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    expected = layer.base_layer.dense_weight(torch.float32) + layer.get_delta_weight("default").detach()
    merged = pm.merge_and_unload()
    w = merged.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.float32 and torch.allclose(w, expected, rtol=0, atol=1e-6)


def _train_adapters(pm, ids, steps: int) -> list[float]:
    """``steps`` AdamW steps on the trainable (adapter) parameters, on one batch; the losses."""
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _dense_copy(model, like):
    import copy

    ref = copy.deepcopy(like).float()
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    return ref


def test_bf16_model_keeps_codes_through_casts_and_saves_a_stock_checkpoint(tmp_path):
    src = tiny_family("qwen3")
    (tmp_path / "ckpt").mkdir()
    _write_checkpoint(tmp_path / "ckpt", src, "fp8", (32, 32))
    model, _ = hf_fp8.from_pretrained(tmp_path / "ckpt")
    layer = model.model.layers[0].mlp.up_proj
    codes = layer.weight.detach().clone()
    model.to(torch.bfloat16).float()  # casts keep the codes; the compute dtype follows
    assert layer.weight.dtype == torch.float8_e4m3fn and torch.equal(
        layer.weight.view(torch.uint8), codes.view(torch.uint8)
    )
    assert layer.compute_dtype == torch.float32 and layer.fp8_weight_scale_inv.dtype == torch.float32
    model.save_pretrained(tmp_path / "stock")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stock", dtype=torch.float32)
    assert torch.equal(reloaded.model.layers[0].mlp.up_proj.weight, layer.dense_weight(torch.float32))


def test_clear_errors(tmp_path):
    src = tiny_family("llama")
    _write_checkpoint(tmp_path, src, "fp8", (128, 128))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not an FP8 checkpoint format"):
        hf_fp8.from_pretrained(tmp_path)
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [64, 64]}  # not the stored layout
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="takes a scale of shape"):
        hf_fp8.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        hf_fp8.from_pretrained(tmp_path / "nowhere")


def test_lora_merged_model_exports_in_the_checkpoints_own_block_layout(tmp_path):
    """Load (blocks 32x64) -> LoRA -> merge -> save_fp8: the layers LoRA did not touch keep the
    checkpoint's codes and scales bit for bit, the merged ones are quantized once in the same
    layout, and transformers' own FP8 loader reads the export."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    from hf_fp8.integrations.export import quantize_blockwise

    src = tiny_family(
        "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64
    )
    (tmp_path / "src").mkdir()
    quantized = _write_checkpoint(tmp_path / "src", src, "fp8", (32, 64))
    model, _ = hf_fp8.from_pretrained(tmp_path / "src", dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(1, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    merged = pm.merge_and_unload()
    hf_fp8.save_fp8(merged, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert cfg["weight_block_size"] == [32, 64]
    out = load_file(tmp_path / "out" / "model.safetensors")
    for name, (codes, scale) in quantized.items():
        got, got_scale = out[f"{name}.weight"], out[f"{name}.weight_scale_inv"]
        if name.endswith(("q_proj", "v_proj")):  # merged: base + delta quantized once, same layout
            want, want_scale = quantize_blockwise(merged.get_submodule(name).weight.detach(), (32, 64))
        else:  # untouched: the checkpoint's own codes and scales
            want, want_scale = codes, scale
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)) and torch.equal(got_scale, want_scale), name
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", quantization_config=FineGrainedFP8Config(dequantize=True), dtype=torch.float32
    )
    ours, _ = hf_fp8.from_pretrained(tmp_path / "out", hf_fp8.Fp8Config(exclude=("*",)), dtype=torch.float32)
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5  # the same dequantized weights


def test_blockwise_recipe_runs_the_frozen_block_layers_as_fp8_gemms_on_their_codes(tmp_path):
    """Under the blockwise recipe, frozen 128x128-block layers take their input (and output
    gradient) in 1x128 E4M3 tiles and multiply the stored codes with their block scales, as the
    checkpoint is served; LoRA trains on top, and the coverage report counts them as FP8 layers."""
    from helpers import rel_err

    from hf_fp8.kernels import blockwise_reference as B

    src = tiny_family(
        "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=128
    )
    _write_checkpoint(tmp_path, src, "fp8", (128, 128))
    model, report = hf_fp8.from_pretrained(tmp_path, "blockwise", dtype=torch.float32)
    assert any("14 of 14 frozen layers run blockwise FP8 GEMMs" in n for n in report.notes), report.notes
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, FrozenFp8Linear) and layer.fp8_gemm and "blockwise FP8 GEMMs" in repr(layer)
    # one layer against a float64 evaluation of the quantized function: x and dY in 1x128 tiles,
    # the stored codes in their blocks; each GEMM's result is BF16 (as on the GPU): 2^-8 relative
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 512, generator=g).requires_grad_()
    dy = torch.randn(40, 256, generator=g)
    y = layer(x)
    y.backward(dy)
    W = B.dequantize_blocks(layer.weight, layer.fp8_weight_scale_inv).double()
    qx, qg = B.quantize_tiles(x.detach(), torch.float8_e4m3fn), B.quantize_tiles(dy, torch.float8_e4m3fn)
    assert rel_err(B.dequantize_tiles(qx.data, qx.scale_inv).double() @ W.t(), y) < 2.0**-8
    assert rel_err(B.dequantize_tiles(qg.data, qg.scale_inv).double() @ W, x.grad) < 2.0**-8
    # LoRA on top learns, and the report counts the frozen layers' FP8 forwards and backwards
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=list(LINEARS)))
    hf_fp8.reset_fp8_coverage(pm)
    ids = torch.randint(1, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    losses = _train_adapters(pm, ids, 20)
    assert losses[-1] < losses[0] - 0.5, losses
    cov = hf_fp8.fp8_coverage(pm)
    frozen = [n for n in cov.layers if "base_layer" in n]
    assert len(frozen) == 14 and not cov.dequantized
    # every backward ran its input-gradient GEMM in FP8, except where the input needs no gradient
    # (layer 0's q/k/v read the frozen embedding's normed output)
    first = ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj")
    assert all(cov.layers[n] == (20, 0, 0 if any(f in n for f in first) else 20) for n in frozen), cov.layers
