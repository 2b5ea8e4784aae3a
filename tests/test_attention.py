"""FP8 attention: the cast and forward kernels (Triton interpreter) against float64 references,
the HF attention-interface function, fallbacks, and the switch through Fp8Config / from_pretrained."""

from __future__ import annotations

import warnings

import pytest
import torch
from llama_fixtures import tiny_llama

import hf_fp8
from hf_fp8.integrations import attention as A
from hf_fp8.kernels.attention import fp8_attention_fwd, quantize_heads, quantize_rows
from hf_fp8.kernels.attention_reference import (
    fp8_attention_reference,
    quantize_heads_reference,
    quantize_rows_reference,
)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _qkv(B=1, H=4, Hk=2, S=80, D=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q from a (B, S, H, D) projection, transposed like HF does: a strided view
    q = torch.randn(B, S, H, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, Hk, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hk, S, D, generator=g).to(dtype)
    return q, k, v


def _exact(q, k, v, causal, scale=None):
    g = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q.double(),
        k.double().repeat_interleave(g, 1),
        v.double().repeat_interleave(g, 1),
        is_causal=causal,
        scale=scale,
    ).transpose(1, 2)


@pytest.mark.parametrize("transpose", [False, True])
def test_cast_kernel_bit_exact(transpose):
    q, _, _ = _qkv(S=70)  # S not a multiple of the kernel's 64-token block
    q[0, 1] *= 1e-3  # heads with very different ranges get their own scales
    codes, scale_inv = quantize_heads(q, transpose=transpose)
    ref, ref_scale_inv = quantize_heads_reference(q)
    got = codes.transpose(-1, -2) if transpose else codes
    assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(scale_inv, ref_scale_inv)


def test_row_cast_kernel_bit_exact_with_special_rows():
    q, _, _ = _qkv(S=70)
    q[0, 0, 3] = 0.0  # an all-zero row: scale 1
    q[0, 1, 5, 7] = float("inf")  # inf and NaN rows: scale 1, those elements NaN, the rest still cast
    q[0, 2, 9, 1] = float("nan")
    codes, scale_inv = quantize_rows(q)
    ref, ref_scale_inv = quantize_rows_reference(q)
    assert torch.equal(codes.view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(scale_inv, ref_scale_inv)
    assert scale_inv[0, 0, 3] == scale_inv[0, 1, 5] == scale_inv[0, 2, 9] == 1.0


@pytest.mark.parametrize(
    "B, H, Hk, S, D, causal",
    [
        (1, 4, 2, 80, 64, True),  # GQA, S not a multiple of the block
        (2, 2, 2, 64, 64, False),  # MHA, bidirectional
        (1, 2, 1, 40, 128, True),  # head_dim 128, one KV head
    ],
)
def test_forward_kernel_against_float64(B, H, Hk, S, D, causal):
    q, k, v = _qkv(B, H, Hk, S, D)
    out, lse = fp8_attention_fwd(q, k, v, causal=causal)
    assert out.shape == (B, S, H, D) and out.dtype == torch.bfloat16 and lse.shape == (B, H, S)
    quantized = fp8_attention_reference(q, k, v, causal=causal, compute_dtype=torch.float64)
    exact = _exact(q, k, v, causal)
    # Same quantized function: the kernel rounds P against its running row maximum, the
    # reference against the final one (one E4M3 rounding, 2^-4 relative, of some P values),
    # plus BF16 output rounding: measured 0.7-1.5%.
    assert _rel(out, quantized) < 0.03
    # FP8 attention vs exact attention: E4M3 steps of 2^-4 relative on Q, K, V and P. On random
    # inputs the output averages many values, so its norm is small and relative error large:
    # measured 4.5-5%, and the quantized float64 reference itself is as far.
    assert _rel(out, exact) < 0.08 and _rel(out, exact) < 1.3 * _rel(quantized, exact)
    # log-sum-exp (natural) of the scaled scores, against the unquantized float64 value
    g = H // Hk
    s = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) / D**0.5
    if causal:
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    assert (lse.double() - torch.logsumexp(s, -1)).abs().max() < 0.15  # score errors of a few % of |s| ~ 3


@pytest.mark.parametrize("use_tma", [True, False])
def test_tma_and_pointer_kernels_agree(use_tma, monkeypatch):
    from hf_fp8.kernels import attention as K

    monkeypatch.setattr(K, "USE_TMA", use_tma)
    q, k, v = _qkv(S=96)
    out, lse = fp8_attention_fwd(q, k, v, causal=True)
    monkeypatch.setattr(K, "USE_TMA", not use_tma)
    out2, lse2 = fp8_attention_fwd(q, k, v, causal=True)
    # same tiles, same order of operations: identical results
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_backward_through_the_kernel_path_matches_exact_attention_gradients():
    q, k, v = _qkv(S=48)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    g = torch.randn(1, 48, 4, 64, dtype=torch.bfloat16)
    with hf_fp8.kernel_backend("triton"):
        out = A.fp8_attention(q, k, v, causal=True)
    out.backward(g)
    assert A._backward_path["last"] == "recompute"  # no FlashAttention backward on a CPU
    qe, ke, ve = (t.detach().double().requires_grad_() for t in (q, k, v))
    _exact(qe, ke, ve, True).backward(g.double())
    # BF16 backward of exact attention at the unquantized inputs: within BF16 rounding
    for got, ref in ((q.grad, qe.grad), (k.grad, ke.grad), (v.grad, ve.grad)):
        assert _rel(got, ref) < 0.02


def test_emulation_path_is_differentiable_and_close_to_exact():
    q, k, v = _qkv(S=32)
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = A.fp8_attention(q, k, v, causal=True)  # CPU: the torch emulation
    assert _rel(out, _exact(q, k, v, True)) < 0.08
    out.square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_hf_llama_with_fp8_attention_tracks_sdpa():
    A.register_attention()
    model = tiny_llama(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids, labels=ids).loss
    ref.backward()
    ref_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    model.set_attn_implementation("hf_fp8")
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    # loss of a random 2-layer model: FP8 attention moves it by ~2e-4 relative (measured)
    assert abs(loss.item() - ref.item()) < 0.01 * ref.item()
    cos = torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0)
    assert cos > 0.95  # emulated quantization through two layers; measured ~0.99


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(attention_mask=torch.zeros(1, 1, 16, 16, dtype=torch.bool)), "explicit attention mask"),
        (dict(dropout=0.1), "dropout"),
        (dict(head_dim=32), "head_dim 32"),
        (dict(q_len=1), "KV-cache decoding"),
    ],
)
def test_unsupported_cases_fall_back_to_sdpa_with_one_warning(kwargs, reason):
    head_dim = kwargs.pop("head_dim", 64)
    q_len = kwargs.pop("q_len", 16)
    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = 2
    q = torch.randn(1, 4, q_len, head_dim)
    k = torch.randn(1, 2, 16, head_dim)
    v = torch.randn(1, 2, 16, head_dim)
    A._warned.discard(next((r for r in A._warned if reason in r), ""))
    with pytest.warns(UserWarning, match=reason):
        out, _ = A.fp8_attention_forward(module, q, k, v, kwargs.pop("attention_mask", None), **kwargs)
    assert out.shape == (1, q_len, 4, head_dim)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # second time: no warning
        A.fp8_attention_forward(
            module, q, k, v, None if "mask" not in reason else torch.zeros(1, 1, q_len, 16, dtype=torch.bool), **kwargs
        )


def test_convert_switches_attention_and_revert_restores_it(tmp_path):
    model = tiny_llama(attn_implementation="sdpa")
    report = hf_fp8.convert(model, hf_fp8.Fp8Config(fp8_attention=True))
    assert model.config._attn_implementation == "hf_fp8"
    assert any("attn_implementation='hf_fp8'" in n for n in report.notes)
    hf_fp8.revert(model)
    assert model.config._attn_implementation == "sdpa"
    # from_pretrained(..., attn_implementation="hf_fp8") once registered
    model.save_pretrained(tmp_path)
    from transformers import LlamaForCausalLM

    A.register_attention()
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="hf_fp8")
    assert loaded.config._attn_implementation == "hf_fp8"
    with pytest.raises(ValueError, match="full-BF16"):
        hf_fp8.Fp8Config(recipe=None, fp8_attention=True)


def test_trainer_flag_enables_fp8_attention(tmp_path):
    args = hf_fp8.TrainingArguments(output_dir=str(tmp_path), fp8="tensorwise", fp8_attention=True, report_to="none")
    assert args.fp8_config().fp8_attention


def test_padded_batch_through_the_hf_function_matches_float64():
    # HF passes a 4-D boolean mask for padded batches: the function falls back to SDPA (BF16 here
    # on FP32 inputs: exact up to FP32 rounding) and must match float64 masked attention
    A._warned.discard("an explicit attention mask (padding, packed sequences or a custom mask)")
    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = 2
    q, k, v = (t.float() for t in _qkv(B=2, S=24))
    lengths = torch.tensor([24, 17])  # second sequence left-padded by 7
    keep = torch.arange(24)[None, :] >= (24 - lengths)[:, None]  # (B, S) keys that are real
    causal = torch.ones(24, 24, dtype=torch.bool).tril()
    mask = (causal[None] & keep[:, None, :])[:, None]  # (B, 1, S, S)
    with pytest.warns(UserWarning, match="explicit attention mask"):
        out, _ = A.fp8_attention_forward(module, q, k, v, mask)
    g = q.shape[1] // k.shape[1]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1), attn_mask=mask
    ).transpose(1, 2)
    rows = keep[:, :, None, None].expand_as(out)  # padded query rows attend to nothing useful: skip them
    assert _rel(out[rows], ref[rows]) < 1e-5
