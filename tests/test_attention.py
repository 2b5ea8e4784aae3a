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
    keep_from_ranges,
    key_ranges_from_padding,
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


def _holes(S=16, every=2):
    """A causal (1, 1, S, S) mask whose rows skip keys: no contiguous range per query."""
    pos = torch.arange(S)
    return (torch.ones(S, S, dtype=torch.bool).tril() & ((pos % every == 0)[None, :] | torch.eye(S, dtype=torch.bool)))[
        None, None
    ]


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        # a causal mask with holes: a row's keys are not one contiguous range
        (dict(attention_mask=_holes()), "not contiguous key ranges"),
        (dict(dropout=0.1), "dropout"),
        (dict(head_dim=32), "head_dim 32"),
        (dict(q_len=1), "KV-cache decoding"),
    ],
)
def test_unsupported_cases_fall_back_to_sdpa_with_one_warning(kwargs, reason):
    kwargs = dict(kwargs)
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
        mask = None if "contiguous" not in reason else _holes(every=3)  # another custom mask
        A.fp8_attention_forward(module, q, k, v, mask, **kwargs)


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


def _padding(B=2, S=24, left=(0, 7), right=(0, 0)):
    """(B, S) bool, True for real tokens: row b has ``left[b]`` padding tokens first, ``right[b]`` last."""
    pos = torch.arange(S)[None, :]
    return (pos >= torch.tensor(left)[:, None]) & (pos < S - torch.tensor(right)[:, None])


def _hf_mask(valid, causal=True, fix_empty_rows=False):
    """The boolean (B, 1, S, S) mask HF builds for a padded batch (True = attend)."""
    S = valid.shape[1]
    keep = valid[:, None, :].expand(-1, S, -1)
    if causal:
        keep = keep & torch.ones(S, S, dtype=torch.bool).tril()
    if fix_empty_rows:  # some transformers versions let rows with no key attend to every key
        keep = keep | ~keep.any(-1, keepdim=True)
    return keep[:, None]


def _masked_exact(q, k, v, valid, causal):
    g = q.shape[1] // k.shape[1]
    keep = _hf_mask(valid, causal, fix_empty_rows=True)
    return torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1), attn_mask=keep
    ).transpose(1, 2)


def _queries_with_keys(valid, causal):
    lo, hi = key_ranges_from_padding(valid, causal)
    return lo <= hi


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("left, right", [((37, 0), (0, 20)), ((0, 0), (9, 33))])
def test_forward_kernel_with_key_padding_against_float64(causal, left, right):
    B, H, Hk, S, D = 2, 4, 2, 80, 64
    q, k, v = _qkv(B, H, Hk, S, D)
    valid = _padding(B, S, left, right)
    k[~valid[:, None, :, None].expand_as(k)] *= 60  # large padding keys: they must not set the K scale
    v[~valid[:, None, :, None].expand_as(v)] *= 60
    out, lse = fp8_attention_fwd(q, k, v, causal=causal, kv_valid=valid)
    quantized = fp8_attention_reference(q, k, v, causal=causal, kv_valid=valid, compute_dtype=torch.float64)
    rows = _queries_with_keys(valid, causal)
    # queries with no real key (left padding, causal): output 0, log-sum-exp +inf
    assert torch.equal(out[~rows], torch.zeros_like(out[~rows])) and torch.isinf(lse.transpose(1, 2)[~rows]).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse.transpose(1, 2)[rows]).all()
    # the same quantized function (P rounded against the running maximum, BF16 output), as the
    # unpadded test: measured 0.7-1.5%; against exact masked attention as there: 4.5-5%
    assert _rel(out[rows], quantized[rows]) < 0.03
    exact = _masked_exact(q, k, v, valid, causal)
    assert _rel(out[rows], exact[rows]) < 0.08
    # the scales come from the real tokens: each sequence alone (its padding cut) gives the same
    # K/V codes, hence the same attention up to the kernel's block-wise P rounding
    for b in range(B):
        keep = valid[b]
        alone, _ = fp8_attention_fwd(q[b : b + 1, :, keep], k[b : b + 1, :, keep], v[b : b + 1, :, keep], causal=causal)
        assert _rel(out[b, keep], alone[0]) < 0.02


def test_key_padding_quantizes_keys_and_values_with_the_real_tokens_scales():
    q, k, v = _qkv(B=2, S=70)
    valid = _padding(2, 70, (0, 30), (5, 0))
    k[~valid[:, None, :, None].expand_as(k)] = 1e4
    codes, scale_inv = quantize_heads(k, valid=valid)
    ref, ref_scale_inv = quantize_heads_reference(k, valid)
    assert torch.equal(codes.view(torch.uint8), ref.view(torch.uint8)) and torch.equal(scale_inv, ref_scale_inv)
    real = k.masked_fill(~valid[:, None, :, None], 0).abs().amax(dim=(2, 3)).float()
    assert torch.equal(scale_inv, torch.ones_like(real) / (torch.full_like(real, 448.0) / real))


def _packed_mask(lengths, causal=True):
    """(1, 1, S, S): sequences packed one after the other, each attending to itself only."""
    block = torch.block_diag(*(torch.ones(n, n) for n in lengths)).bool()
    return (block.tril() if causal else block)[None, None]


@pytest.mark.parametrize("causal", [True, False])
def test_masks_of_contiguous_key_ranges_are_read_exactly_and_others_fall_back(causal):
    valid = _padding(3, 16, (0, 5, 0), (0, 0, 4))
    pos = torch.arange(16)
    band = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - 4)  # a sliding window of 4
    readable = {
        "padding": _hf_mask(valid, causal),
        "padding, empty rows attending everywhere": _hf_mask(valid, causal, fix_empty_rows=True),
        "one sample's mask broadcast over the batch": _hf_mask(valid[2:], causal).clone(),
        "packed sequences": _packed_mask((5, 8, 3), causal).expand(3, 1, 16, 16).clone(),
        "a query-side mask too": _hf_mask(valid, causal) & valid[:, None, :, None],
        "a sliding window": band[None, None].expand(3, 1, 16, 16).clone(),
    }
    for what, mask in readable.items():
        plan, reason = A.mask_plan(mask, 3, 16, causal)
        assert reason is None and plan is not None, what
        # the ranges are the mask, row for row (empty rows: lo > hi)
        assert torch.equal(keep_from_ranges(plan.lo, plan.hi), mask.expand(3, 1, 16, 16)), what
        # the K/V scales come from the keys some query attends to
        assert plan.kv_valid is None or torch.equal(plan.kv_valid, mask.expand(3, 1, 16, 16)[:, 0].any(-2)), what
    plan, reason = A.mask_plan(_hf_mask(valid, causal), 3, 16, causal)
    assert torch.equal(plan.kv_valid, valid)
    # plain causal (or full) attention needs no mask
    assert A.mask_plan(_hf_mask(torch.ones(3, 16, dtype=torch.bool), causal).clone(), 3, 16, causal) == (None, None)
    # not readable: keys with holes, a float mask, a mask for another batch size
    for mask, words in (
        (_holes().expand(3, 1, 16, 16).clone(), "not contiguous key ranges"),
        (torch.zeros(3, 1, 16, 16), "not boolean"),
        (_hf_mask(valid[:2], causal), "for 2 sequences in a batch of 3"),
    ):
        plan, reason = A.mask_plan(mask, 3, 16, causal)
        assert plan is None and words in reason


def test_masks_read_in_chunks_of_rows_give_the_same_plan(monkeypatch):
    valid = _padding(3, 16, (0, 5, 0), (0, 0, 4))
    mask = _packed_mask((5, 8, 3)).expand(3, 1, 16, 16) & _hf_mask(valid)
    whole, _ = A._read_mask(mask, 3, 16, True)
    monkeypatch.setattr(A, "_MASK_CHUNK_ELEMENTS", 3 * 16 * 5)  # 5 rows at a time
    chunked, _ = A._read_mask(mask, 3, 16, True)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))
    holes = _holes().expand(3, 1, 16, 16).clone()
    assert A._read_mask(holes, 3, 16, True) == (None, A._MASK_REASON)


def test_the_mask_is_read_once_per_mask_object(monkeypatch):
    valid = _padding()
    mask = _hf_mask(valid)
    calls = []
    read = A._read_mask
    monkeypatch.setattr(A, "_read_mask", lambda *a: calls.append(1) or read(*a))
    for _ in range(3):  # every layer of a forward gets the same mask object
        assert torch.equal(A.mask_plan(mask, 2, 24, True)[0].kv_valid, valid)
    assert len(calls) == 1
    mask[0, 0, 10, 3] = False  # changed in place: read again (a hole now)
    assert A.mask_plan(mask, 2, 24, True)[0] is None and len(calls) == 2


@pytest.mark.parametrize("causal", [True, False])
def test_kernel_with_packed_sequences_against_float64_and_each_sequence_alone(causal):
    B, H, Hk, S, D = 1, 4, 2, 96, 64
    lengths = (40, 7, 49)  # boundaries inside the kernel's key blocks
    q, k, v = _qkv(B, H, Hk, S, D)
    plan, _ = A.mask_plan(_packed_mask(lengths, causal), B, S, causal)
    out, lse = fp8_attention_fwd(q, k, v, causal=causal, key_ranges=(plan.lo, plan.hi))
    quantized = fp8_attention_reference(
        q, k, v, causal=causal, key_ranges=(plan.lo, plan.hi), compute_dtype=torch.float64
    )
    assert _rel(out, quantized) < 0.03  # as the unmasked test
    g = H // Hk
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1),
        attn_mask=_packed_mask(lengths, causal),
    ).transpose(1, 2)  # fmt: skip
    assert _rel(out, exact) < 0.08
    start = 0
    for n in lengths:  # each sequence alone: the same attention but for the K/V scales of the pack
        sl = slice(start, start + n)
        alone, _ = fp8_attention_fwd(q[:, :, sl], k[:, :, sl], v[:, :, sl], causal=causal)
        # two FP8 evaluations (the pack's K/V scales, the sequence's), each ~5% from exact
        assert _rel(out[:, sl], alone) < 0.08 and _rel(out[:, sl], exact[:, sl]) < 0.08
        start += n


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_batch_through_the_hf_function_runs_fp8_and_matches_float64(backend):
    # HF passes a 4-D boolean mask for padded batches (left and right padding here): FP8 attention
    # runs (no fallback warning), honours the mask, and its gradient is that of exact masked
    # attention (straight-through on the CPU emulation, the BF16 recompute behind the kernel)
    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = 2
    q, k, v = _qkv(B=2, S=24, dtype=torch.float32 if backend == "torch" else torch.bfloat16)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    valid = _padding(2, 24, (0, 7), (5, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with hf_fp8.kernel_backend(backend):
            out, _ = A.fp8_attention_forward(module, q, k, v, _hf_mask(valid))
    rows = _queries_with_keys(valid, True)
    ref = _masked_exact(q.detach(), k.detach(), v.detach(), valid, True)
    assert _rel(out[rows], ref[rows]) < 0.08  # FP8 attention against exact, as above
    assert torch.equal(out[~rows], torch.zeros_like(out[~rows]))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    out.backward(g)
    if backend == "triton":
        assert A._backward_path["last"] == "recompute_masked"
    qe, ke, ve = (t.detach().double().requires_grad_() for t in (q, k, v))
    (_masked_exact(qe, ke, ve, valid, True) * rows[:, :, None, None]).backward(g.double())
    for got, want in ((q.grad, qe.grad), (k.grad, ke.grad), (v.grad, ve.grad)):
        assert torch.isfinite(got).all()
        # the emulation differentiates the quantized attention (straight-through): ~5% like its
        # forward; the kernel path's BF16 backward of exact attention: within BF16 rounding
        assert _rel(got, want) < (0.1 if backend == "torch" else 0.02)


def test_padded_llama_batch_with_fp8_attention_trains_as_its_sequences_one_by_one():
    A.register_attention()
    model = tiny_llama(seed=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="rowwise", auto_filter=False, fp8_attention=True))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 512, (n,), generator=g) for n in (24, 15, 9)]
    S = 24
    ids = torch.zeros(3, S, dtype=torch.long)
    mask = torch.zeros(3, S, dtype=torch.long)
    labels = torch.full((3, S), -100)
    for b, s in enumerate(seqs):  # right, left, right padding
        sl = slice(S - len(s), S) if b == 1 else slice(0, len(s))
        ids[b, sl], mask[b, sl], labels[b, sl] = s, 1, s
    labels[1, S - len(seqs[1])] = -100  # (left padding: the last pad position would predict the first token)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    hf_fp8.reset_fp8_coverage(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    cov = hf_fp8.fp8_coverage(model)
    assert set(map(frozenset, (c.items() for c in cov.attention.values()))) == {frozenset({("fp8", 1)})}
    # each sequence alone: the same tokens, positions and (rowwise, FP8 attention with per-row Q and
    # real-token K/V scales) the same quantization; only FP32 sums and the kernel-emulation's
    # P rounding against a different row maximum differ: measured 1e-6 relative
    total = sum(len(s) - 1 for s in seqs)
    ref = sum(model(input_ids=s[None], labels=s[None]).loss.item() * (len(s) - 1) for s in seqs) / total
    assert out.loss.item() == pytest.approx(ref, rel=1e-4)
