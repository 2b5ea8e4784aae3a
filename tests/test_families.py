"""Every family in hf_fp8's model-family table (Llama, Mistral, Qwen2, Qwen3) gets every feature
Llama has, on tiny configs: the non-FP8 parts (FP32 RoPE after Qwen3's q/k norms, FP32 chunked
loss, fused RMSNorm/SwiGLU) compute stock HF's function in FP32; FP8 within its tolerance; stock
save/reload; LoRA on FP8 bases; FP8 export; the Trainer flag; FP8 attention with sliding windows
honoured or named. A family not in the table gets FP8 linears and one warning."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from llama_fixtures import FAMILY_CLASSES, tiny_family

import hf_fp8
from hf_fp8.integrations.families import FAMILIES, family_of
from hf_fp8.integrations.rope import RopeInputs

TYPES = sorted(FAMILIES)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _loss_and_grads(model, ids, mask=None):
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out.loss.detach(), grads


def test_the_table_covers_the_families_and_names_real_classes():
    assert set(FAMILIES) == set(FAMILY_CLASSES)
    for family in FAMILIES.values():
        modeling = __import__(f"transformers.models.{family.model_type}.modeling_{family.model_type}", fromlist=["x"])
        for cls in (family.causal_lm, family.attention, family.decoder, family.norm, family.mlp):
            assert hasattr(modeling, cls), cls


@pytest.mark.parametrize("model_type", TYPES)
def test_fp32_model_patched_without_fp8_computes_stock_hf(model_type):
    """FP32 RoPE, FP32 chunked loss and the fused norms/SwiGLU, no FP8 layer (``exclude=("*",)``),
    on an FP32 model with left padding: the same function as stock HF (only cos/sin and the
    order of FP32 sums differ, ~1e-7 per op; 1e-5 bounds it), Qwen3's q/k norms before RoPE."""
    ref = tiny_family(model_type, attn_implementation="sdpa")
    model = copy.deepcopy(ref)
    report = hf_fp8.convert(model, hf_fp8.Fp8Config(exclude=("*",)))
    assert report.rope.startswith("FP32 rotation in 2 attention layers") and report.loss.startswith("FP32")
    assert any("fused RMSNorm" in n for n in report.notes)
    if model_type == "qwen3":  # the q/k norms are the family's RMSNorm class: fused too
        assert model.model.layers[0].self_attn.q_norm.__dict__.get("_hf_fp8_fused")
    ids = torch.randint(1, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ref_loss, ref_grads = _loss_and_grads(ref, ids, mask)
    loss, grads = _loss_and_grads(model, ids, mask)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert _rel(grads[name], ref_grads[name]) < 1e-5, name


@pytest.mark.parametrize("model_type", TYPES)
def test_rope_inputs_carry_the_fp32_inv_freq_of_the_family_config(model_type):
    """RoPE at Qwen's rope_theta 1e6: the attention layers rotate by HF's own FP32 inv_freq (the
    kernel's rounding at theta 1e6 is tested in test_rope_kernel.py), kept FP32 through BF16."""
    model = tiny_family(model_type)
    expected = copy.deepcopy(model).model.rotary_emb.inv_freq.clone()
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="rowwise", auto_filter=False))
    model.to(torch.bfloat16)
    seen = []
    attn = model.model.layers[0].self_attn
    attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_embeddings"]), with_kwargs=True)
    model(input_ids=torch.randint(1, 512, (1, 8)))
    assert isinstance(seen[0], RopeInputs) and seen[0].inv_freq.dtype == torch.float32
    assert torch.equal(seen[0].inv_freq, expected)


@pytest.mark.parametrize("recipe", ["rowwise", "delayed"])
@pytest.mark.parametrize("model_type", TYPES)
def test_fp8_training_tracks_stock_within_fp8_tolerance(model_type, recipe):
    ref = tiny_family(model_type, seed=1)
    model = copy.deepcopy(ref)
    report = hf_fp8.convert(model, hf_fp8.Fp8Config(recipe=recipe, auto_filter=False))
    assert len(report.converted) == 14  # 7 decoder linears x 2 layers; lm_head stays high precision
    if model_type == "qwen2":  # q/k/v keep their biases, in the FP8 layer
        q = model.model.layers[0].self_attn.q_proj
        assert isinstance(q, hf_fp8.Fp8Linear) and q.bias is not None
        assert torch.equal(q.bias, ref.model.layers[0].self_attn.q_proj.bias)
    ids = torch.randint(1, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    opts = [torch.optim.SGD(m.parameters(), lr=0.2) for m in (ref, model)]
    history = []
    for _ in range(5):
        losses = []
        for m, opt in zip((ref, model), opts):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        history.append(losses)
    # E4M3 forward casts (2^-4 relative steps) through two tiny layers: the first loss within
    # ~1e-3 (measured); then the two runs learn the same batch along slightly different paths
    assert history[0][1] == pytest.approx(history[0][0], rel=5e-3)
    assert history[-1][1] == pytest.approx(history[-1][0], rel=3e-2)
    assert history[-1][1] < history[0][1] - 0.1  # it learns


@pytest.mark.parametrize("model_type", TYPES)
def test_save_pretrained_reloads_in_stock_transformers(model_type, tmp_path):
    model = tiny_family(model_type).to(torch.bfloat16)
    stock_keys = set(model.state_dict())
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="delayed", auto_filter=False))
    ids = torch.randint(1, 512, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert type(reloaded).__name__ == FAMILY_CLASSES[model_type][1]
    assert set(reloaded.state_dict()) == stock_keys
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


@pytest.mark.parametrize("model_type", TYPES)
def test_lora_on_fp8_base_trains_adapters_only(model_type):
    peft = pytest.importorskip("peft")
    model = tiny_family(model_type)
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="rowwise", auto_filter=False))
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer, hf_fp8.Fp8Linear)
    ids = torch.randint(1, 512, (2, 16))
    pm(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert hf_fp8.integrations.loss.causal_lm(pm) is model  # the FP32 loss serves the PEFT model


@pytest.mark.parametrize("model_type", TYPES)
def test_fp8_export_round_trip(model_type, tmp_path):
    model = tiny_family(model_type, num_key_value_heads=4, head_dim=32).to(torch.bfloat16)
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="delayed", auto_filter=False))
    hf_fp8.save_fp8(model, tmp_path)
    loaded, report = hf_fp8.load_fp8(tmp_path, hf_fp8.Fp8Config(recipe="delayed", auto_filter=False))
    assert type(loaded).__name__ == FAMILY_CLASSES[model_type][1] and len(report.converted) == 14
    assert report.rope.startswith("FP32 rotation")
    ids = torch.randint(1, 512, (1, 12))
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = loaded(input_ids=ids).logits
    assert _rel(b, a) < 0.05  # weights rounded once more to FP8 with 128x128 blocks


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])  # Llama: test_trainer.py
def test_trainer_flag(model_type, tmp_path):
    from test_trainer import _args, _Data

    model = tiny_family(model_type)
    args = _args(tmp_path, fp8="rowwise", fp8_auto_filter=False, max_steps=2)
    trainer = hf_fp8.Trainer(model=model, args=args, train_dataset=_Data())
    trainer.train()
    assert sum(isinstance(m, hf_fp8.Fp8Linear) for m in model.modules()) == 14
    assert family_of(model).model_type == model_type and model._hf_fp8_rope_patch.active


def _attention_outcomes(model):
    cov = hf_fp8.fp8_coverage(model, reset=True)
    return [set(seen) for seen in cov.attention.values()]


@pytest.mark.parametrize(
    "model_type, window_kw",
    [
        ("mistral", dict(sliding_window=8)),  # one window for every layer
        ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),  # layer 1 only
        ("qwen3", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    ],
)
def test_fp8_attention_honours_sliding_windows(model_type, window_kw):
    """Sliding windows run the FP8 kernel: within the window it changes nothing (no mask); beyond
    it, HF's mask carries the window, read as per-query key ranges. The result tracks stock HF's
    SDPA with the window, and differs from attention without it."""
    model = tiny_family(model_type, hidden_size=256, num_attention_heads=4, head_dim=64, **window_kw)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sdpa")
    no_window = tiny_family(model_type, hidden_size=256, num_attention_heads=4, head_dim=64)
    no_window.load_state_dict(model.state_dict())
    no_window.set_attn_implementation("sdpa")
    hf_fp8.convert(model, _fp8_attn_only())
    windowed = [m.self_attn.__dict__["_hf_fp8_family"].window_of(m.self_attn) for m in model.model.layers]
    assert windowed == ([8, 8] if model_type == "mistral" else [None, 8])
    for length in (8, 24):
        ids = torch.randint(1, 512, (1, length), generator=torch.Generator().manual_seed(length))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback
            with torch.no_grad():
                out = model(input_ids=ids).logits
        assert _attention_outcomes(model) == [{"fp8"}, {"fp8"}]
        with torch.no_grad():
            want, unwindowed = ref(input_ids=ids).logits, no_window(input_ids=ids).logits
        # emulated FP8 attention through two layers: ~1-2% of the logits (measured)
        assert _rel(out, want) < 0.05
        if length > 8:  # the window matters here, well beyond FP8's error
            assert _rel(unwindowed, want) > 3 * _rel(out, want)


def _fp8_attn_only():
    """FP8 attention and the family patches, no FP8 linear (so that fallbacks compare exactly)."""
    return hf_fp8.Fp8Config(recipe="rowwise", exclude=("*",), fp8_attention=True)


def test_a_family_not_in_the_table_gets_fp8_linears_and_one_warning():
    cfg = transformers.GemmaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, vocab_size=512,
    )  # fmt: skip
    model = transformers.GemmaForCausalLM(cfg)
    with pytest.warns(UserWarning, match="model_type 'gemma' is not in hf_fp8's model-family table") as record:
        report = hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="rowwise", auto_filter=False))
    assert len([w for w in record if "family table" in str(w.message)]) == 1
    assert "FP32 RoPE, FP32 chunked loss, fused RMSNorm/SwiGLU, selective recompute" in str(record[0].message)
    assert len(report.converted) == 14 and report.rope.startswith("not patched")
    ids = torch.randint(1, 512, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()  # trains
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing requested that is missing: no warning
        hf_fp8.convert(
            transformers.GemmaForCausalLM(cfg),
            hf_fp8.Fp8Config(
                recipe="rowwise",
                auto_filter=False,
                fp32_rope=False,
                fp32_loss=False,
                fused_ops=False,
                keep_activations=0,
            ),
        )
