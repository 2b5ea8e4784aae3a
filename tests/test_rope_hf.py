"""FP32 RoPE inside HF Llama: buffers stay FP32 on every path, numerics match FP32 HF, and the
patch is complete (attention backends, masks, cache, checkpointing) and reversible."""

from __future__ import annotations

import copy

import conftest
import pytest
import torch
from llama_fixtures import enable_activation_checkpointing, tiny_llama
from transformers import LlamaForCausalLM

import hf_fp8
from hf_fp8.integrations.rope import RopeInputs


def _rope_buffers(model):
    r = model.model.rotary_emb
    return r.inv_freq, r.original_inv_freq


def _hf_fp32_inv_freq(model):
    return LlamaForCausalLM(copy.deepcopy(model.config)).model.rotary_emb.inv_freq


def test_inv_freq_stays_fp32_through_casts():
    model = tiny_llama()
    hf_fp8.patch_rope(model)
    expected = _hf_fp32_inv_freq(model)
    for cast in (
        lambda m: m.to(torch.bfloat16),
        lambda m: m.half(),
        lambda m: m.to("cpu", torch.bfloat16),
        lambda m: m.bfloat16().float(),
    ):
        cast(model)
        for buf in _rope_buffers(model):
            assert buf.dtype == torch.float32
            assert torch.equal(buf, expected)


def test_patching_a_bf16_model_recovers_fp32_inv_freq():
    model = tiny_llama().to(torch.bfloat16)  # stock HF: inv_freq is BF16 now, precision lost
    assert model.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    hf_fp8.patch_rope(model)
    assert torch.equal(model.model.rotary_emb.inv_freq, _hf_fp32_inv_freq(model))


def test_save_and_reload_paths(tmp_path):
    model = tiny_llama()
    keys = set(model.state_dict())
    hf_fp8.patch_rope(model)
    model.to(torch.bfloat16)
    assert set(model.state_dict()) == keys  # RoPE buffers are not persistent: nothing hf_fp8-only is saved
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert reloaded.model.rotary_emb.inv_freq.dtype == torch.float32  # stock loader keeps FP32
    hf_fp8.patch_rope(reloaded)
    reloaded.to(torch.bfloat16)
    assert reloaded.model.rotary_emb.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fp32_model_same_loss_and_grads_as_stock(attn):
    """FP32 model: the patched path computes the same function; only the cos/sin implementation
    and the summation order differ (~1e-7 relative per op), so 1e-5 relative bounds it."""
    ref = tiny_llama(attn_implementation=attn)
    model = copy.deepcopy(ref)
    hf_fp8.patch_rope(model)
    ids = torch.randint(0, 512, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding in the second sequence
    losses, grads = [], []
    for m in (ref, model):
        out = m(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 1e-5


def test_bf16_model_is_closer_to_fp32_than_stock_bf16():
    fp32 = tiny_llama()
    stock = copy.deepcopy(fp32).to(torch.bfloat16)
    ours = copy.deepcopy(fp32)
    hf_fp8.patch_rope(ours)
    ours.to(torch.bfloat16)
    ids = torch.randint(0, 512, (2, 200))
    with torch.no_grad():
        ref = fp32(input_ids=ids).logits.double()
        err_stock = (stock(input_ids=ids).logits.double() - ref).norm()
        err_ours = (ours(input_ids=ids).logits.double() - ref).norm()
    # the rest of the model is BF16 in both, so the gain is modest but must be there
    assert err_ours < err_stock, (err_ours, err_stock)


def test_position_ids_cache_and_generation():
    ref = tiny_llama()
    model = copy.deepcopy(ref)
    hf_fp8.patch_rope(model)
    ids = torch.randint(0, 512, (1, 12))
    # explicit, shifted position ids (a packed or continued sequence)
    pos = torch.arange(100, 112).view(1, 12)
    torch.testing.assert_close(
        model(input_ids=ids, position_ids=pos).logits, ref(input_ids=ids, position_ids=pos).logits, rtol=1e-5, atol=1e-5
    )
    # greedy generation uses the KV cache and per-step position ids
    out_ref = ref.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, out_ref)


def test_gradient_checkpointing():
    model = tiny_llama()
    hf_fp8.patch_rope(model)
    enable_activation_checkpointing(model)
    model.train()
    ids = torch.randint(0, 512, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_undo_restores_stock_numerics_exactly():
    ref = tiny_llama()
    model = copy.deepcopy(ref)
    patch = hf_fp8.patch_rope(model)
    assert hf_fp8.patch_rope(model) is patch  # idempotent
    hf_fp8.unpatch_rope(model)
    ids = torch.randint(0, 512, (2, 20))
    assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert "forward" not in model.model.layers[0].self_attn.__dict__


def test_convert_patches_and_revert_unpatches():
    model = tiny_llama()
    report = hf_fp8.convert(model, hf_fp8.Fp8Config(auto_filter=False))
    assert report.rope.startswith("FP32 rotation in 2 attention layers")
    assert "forward" in model.model.layers[0].self_attn.__dict__
    hf_fp8.revert(model)
    assert "forward" not in model.model.layers[0].self_attn.__dict__
    model2 = tiny_llama()
    assert hf_fp8.convert(model2, hf_fp8.Fp8Config(fp32_rope=False)).rope == "left as is (fp32_rope=False)"


def test_clear_errors():
    with pytest.raises(ValueError, match="not supported"):
        hf_fp8.patch_rope(torch.nn.Linear(4, 4))
    with pytest.raises(RuntimeError, match="unpatch_rope"):
        cos, sin = RopeInputs(torch.arange(3), torch.ones(2), 1.0)


@pytest.mark.skipif(not conftest.INTERPRETER_PATCHED, reason="needs TRITON_INTERPRET=1")
def test_triton_path_matches_torch_path():
    ref = tiny_llama()
    hf_fp8.patch_rope(ref)
    model = copy.deepcopy(ref)
    ids = torch.randint(0, 512, (2, 24))
    l_torch = ref(input_ids=ids, labels=ids).loss
    with hf_fp8.kernel_backend("triton"):
        l_triton = model(input_ids=ids, labels=ids).loss
        l_triton.backward()
    torch.testing.assert_close(l_triton, l_torch, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    ],
    ids=["llama3", "linear", "dynamic"],
)
def test_rope_types_match_stock_fp32(rope_parameters):
    """Llama 3 frequency scaling, linear and dynamic (which rescales inv_freq for sequences past
    max_position_embeddings=256 here): same logits as stock HF in FP32."""
    ref = tiny_llama(rope_parameters=rope_parameters)
    model = copy.deepcopy(ref)
    hf_fp8.patch_rope(model)
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    for S in (40, 300):  # 300 > max_position_embeddings: the dynamic type grows its frequencies
        ids = torch.randint(0, 512, (1, S))
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_o_proj_keeps_the_attention_output_not_an_fp8_copy():
    """PyTorch's CPU SDPA is flash-style too (keeps its output): the same check as on the GPU."""
    from helpers import check_o_proj_keeps_attention_output

    check_o_proj_keeps_attention_output("cpu", "tensorwise")
