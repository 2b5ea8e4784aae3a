"""``attn_implementation="hf_fp8"``: FP8 dot-product attention behind transformers' AttentionInterface.

Forward: Q, K, V in E4M3 with per-(batch, head) scales and P.V in FP8
(:mod:`hf_fp8.kernels.attention`) on FP8-capable GPUs; the same numerics emulated in torch
elsewhere (``attention_reference``). Backward: BF16, by PyTorch's cuDNN (else FlashAttention-2)
attention backward on the original (unquantized) Q, K, V with our output and log-sum-exp,
i.e. the gradient of exact attention evaluated through our forward's statistics; where neither
op runs, by recomputing BF16 SDPA. Masked batches run the kernel too when each query attends to
one contiguous range of keys, which HF's masks for left or right padding and for packed
sequences (``DataCollatorWithFlattening``) are: the boolean mask is read once per mask object
(one host sync) into per-query key ranges, the kernel visits only the key blocks in range, and
K/V scales come from the tokens some query attends to; the backward then runs cuDNN's with the
mask as a bias (else the recompute). Cases the kernel does not take (other masks, masks under
torch.compile or CUDA-graph capture; dropout; head_dim outside 64/128; a query shorter than the
keys, i.e. KV-cache decoding; attention sinks) run HF's own SDPA attention instead, with a
one-time warning naming the reason. Sliding windows come with HF's mask, read like any other.

Register once per process with :func:`register_attention` (``hf_fp8.convert`` does it when
``Fp8Config(fp8_attention=True)``), then ``from_pretrained(..., attn_implementation="hf_fp8")``
or ``model.set_attn_implementation("hf_fp8")``. The mask function registered beside it is
SDPA's, which returns no mask for plain causal attention.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import NamedTuple

import torch

from hf_fp8._backend import use_triton_kernels

__all__ = [
    "ATTN_IMPLEMENTATION",
    "register_attention",
    "fp8_attention",
    "fp8_attention_forward",
    "fallback_reasons",
    "MaskPlan",
    "mask_plan",
]

ATTN_IMPLEMENTATION = "hf_fp8"
_warned: set[str] = set()
_backward_path: dict[str, str] = {}  # which backward ran last, and why others failed (benchmarks record it)
# Backward kernels tried in order on CUDA; the first that runs is used. Benchmarks may reorder.
BACKWARD_ORDER: tuple[str, ...] = ("cudnn", "flash")


def fallback_reasons() -> set[str]:
    """Reasons for which this process has fallen back to SDPA so far (each warned once)."""
    return set(_warned)


class MaskPlan(NamedTuple):
    """How the kernel takes a mask: per-query key ranges ``lo``/``hi`` (int32 (B, S); query i
    attends to keys lo[i]..hi[i], empty when lo > hi) and ``kv_valid`` ((B, S) bool, the tokens
    whose K/V set the scales; None: all)."""

    lo: torch.Tensor
    hi: torch.Tensor
    kv_valid: torch.Tensor | None


def _keep(plan: MaskPlan) -> torch.Tensor:
    """(B, 1, S, S) bool: which keys each query attends to."""
    from hf_fp8.kernels.attention_reference import keep_from_ranges

    return keep_from_ranges(plan.lo, plan.hi)


def _queries_with_keys(plan: MaskPlan) -> torch.Tensor:
    """(B, S) bool: queries with a key to attend to (the others output 0)."""
    return plan.lo <= plan.hi


def _bf16_backward(kind, dout, q, k, v, out, lse, causal, scale, plan=None):
    """PyTorch's cuDNN or FlashAttention-2 backward fed our output and log-sum-exp (both take the
    natural-log LSE of the scaled scores); K/V expanded for GQA, their gradients summed back.
    A mask (cuDNN only): as an additive bias; rows without a key carry log-sum-exp +inf from
    the forward, so their probabilities, hence gradients, are 0."""
    groups = q.shape[1] // k.shape[1]
    ke = k.repeat_interleave(groups, dim=1) if groups > 1 else k
    ve = v.repeat_interleave(groups, dim=1) if groups > 1 else v
    empty = torch.empty(0, dtype=torch.int64, device=q.device)
    S_q, S_k = q.shape[2], k.shape[2]
    if plan is not None and kind != "cudnn":
        raise TypeError(f"the {kind} backward takes no attention mask")
    if kind == "cudnn":
        bias = None
        if plan is not None:
            zero = torch.zeros((), dtype=q.dtype, device=q.device)
            bias = torch.where(_keep(plan), zero, float("-inf"))
            # one (B, 1, S, S) mask, broadcast over the heads as SDPA's cuDNN forward passes it
            bias = bias.expand(q.shape[0], q.shape[1], S_q, S_k)
            causal = False  # the bias has it
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, ke, ve, out, lse.unsqueeze(-1), empty, empty, bias, None, None, S_q, S_k, 0.0, causal, scale=scale
        )
    else:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, ke, ve, out, lse, None, None, S_q, S_k, 0.0, causal, empty, empty, scale=scale
        )
    if groups > 1:
        B, Hk, S, D = k.shape
        dk = dk.view(B, Hk, groups, S, D).sum(2)
        dv = dv.view(B, Hk, groups, S, D).sum(2)
    return dq, dk, dv


def _recompute_backward(dout, q, k, v, causal, scale, plan=None):
    mask = None
    if plan is not None:
        # rows without a key attend to every key here (their dout is 0): no NaN
        mask = _keep(plan) | ~_queries_with_keys(plan)[:, None, :, None]
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(
            qq, kk, vv, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
            enable_gqa=kk.shape[1] != qq.shape[1],
        )  # fmt: skip
        return torch.autograd.grad(o, (qq, kk, vv), dout)


def _attention_backward(dout, q, k, v, out, lse, causal, scale, plan=None):
    dout_bhsd = dout.transpose(1, 2)
    if plan is not None:
        # the forward's output is 0 (a constant) on queries without a key: no gradient there
        dout_bhsd = dout_bhsd * _queries_with_keys(plan)[:, None, :, None].to(dout.dtype)
    padded = "_masked" if plan is not None else ""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        for kind in BACKWARD_ORDER:
            if f"{kind}{padded}_error" in _backward_path:
                continue  # failed once in this process: do not pay for the failure every step
            if padded and kind != "cudnn":
                continue  # FlashAttention's backward takes no mask
            try:
                grads = _bf16_backward(kind, dout_bhsd, q, k, v, out.transpose(1, 2), lse, causal, scale, plan)
                _backward_path["last"] = kind + padded
                return grads
            except (RuntimeError, TypeError) as e:
                _backward_path[f"{kind}{padded}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    _backward_path["last"] = "recompute" + padded
    return _recompute_backward(dout_bhsd, q, k, v, causal, scale, plan)


class _Fp8AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, plan: MaskPlan | None = None):
        from hf_fp8.kernels.attention import fp8_attention_fwd

        ranges = None if plan is None else (plan.lo, plan.hi)
        kv_valid = None if plan is None else plan.kv_valid
        out, lse = fp8_attention_fwd(q, k, v, causal=causal, scale=scale, kv_valid=kv_valid, key_ranges=ranges)
        ctx.save_for_backward(q, k, v, out, lse, *(ranges or (None, None)))
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, lo, hi = ctx.saved_tensors
        plan = None if lo is None else MaskPlan(lo, hi, None)
        return (*_attention_backward(dout, q, k, v, out, lse, ctx.causal, ctx.scale, plan), None, None, None)


# torch.compile: the Triton forward and the backward's backend choice run as opaque custom ops.
@torch.library.custom_op("hf_fp8::fp8_attention", mutates_args=())
def _fp8_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from hf_fp8.kernels.attention import fp8_attention_fwd

    return fp8_attention_fwd(q, k, v, causal=causal, scale=scale)


@_fp8_attention_op.register_fake
def _(q, k, v, causal, scale):
    B, H, S, D = q.shape
    return q.new_empty((B, S, H, D)), q.new_empty((B, H, S), dtype=torch.float32)


@torch.library.custom_op("hf_fp8::fp8_attention_backward", mutates_args=())
def _fp8_attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(g.contiguous() for g in _attention_backward(dout, q, k, v, out, lse, causal, scale))


@_fp8_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.causal, ctx.scale = causal, scale


def _attn_op_backward(ctx, dout, _dlse):
    dq, dk, dv = _fp8_attention_backward_op(dout, *ctx.saved_tensors, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_fp8_attention_op.register_autograd(_attn_op_backward, setup_context=_attn_setup)


def fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    kv_valid: torch.Tensor | None = None,
    mask: MaskPlan | None = None,
) -> torch.Tensor:
    """FP8 attention of q (B, H, S, D), k/v (B, Hk, S, D) -> (B, S, H, D), differentiable.

    ``kv_valid`` (B, S) bool marks real tokens (key padding: one contiguous run per row);
    ``mask`` (a :class:`MaskPlan`, see :func:`mask_plan`) any mask of contiguous key ranges. A
    query with no key to attend to outputs 0. Triton kernel on FP8-capable GPUs, the torch
    emulation elsewhere.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if mask is None and kv_valid is not None:
        from hf_fp8.kernels.attention_reference import key_ranges_from_padding

        mask = MaskPlan(*key_ranges_from_padding(kv_valid, causal), kv_valid)
    if use_triton_kernels(q):
        if torch.compiler.is_compiling():
            if mask is not None:
                raise NotImplementedError("fp8_attention: masks under torch.compile")
            return _fp8_attention_op(q, k, v, causal, scale)[0]
        return _Fp8AttentionFunction.apply(q, k, v, causal, scale, mask)
    from hf_fp8.kernels.attention_reference import fp8_attention_reference

    ranges = None if mask is None else (mask.lo, mask.hi)
    kv_valid = None if mask is None else mask.kv_valid
    return fp8_attention_reference(q, k, v, causal=causal, scale=scale, kv_valid=kv_valid, key_ranges=ranges)


# The last mask read, so that the other layers of the same forward (and its recompute) reuse it.
_last_mask: list = []  # [weakref to the mask, its version, causal, (plan or None, reason or None)]
_MASK_REASON = "an attention mask whose rows are not contiguous key ranges (a custom mask)"
_WINDOW_REASON = "a sliding window shorter than the sequence without a mask that has it"
# Reading a mask makes byte-sized temporaries of its rows, this many elements at a time (16 MB;
# all at once would be 128 MB for B=8, S=4096)
_MASK_CHUNK_ELEMENTS = 1 << 24


def mask_plan(mask: torch.Tensor, batch: int, seq: int, causal: bool) -> tuple[MaskPlan | None, str | None]:
    """How the kernel takes ``mask`` (HF's boolean (B|1, 1, S, S) mask, True = attend):
    ``(plan, None)`` when every query attends to one contiguous range of keys (causal
    attention, left or right padding, packed sequences); ``(None, None)`` when the mask is plain
    causal (or full, if not ``causal``) attention, which needs no mask; else ``(None, reason)``.
    Rows with no key (left padding) output 0 in the kernel, where SDPA gives NaN or, as some
    transformers versions make such rows attend everywhere, values no loss reads.

    Reading it takes one host sync per distinct mask; HF passes the same mask object to every layer.
    """
    if _last_mask and _last_mask[0]() is mask and _last_mask[1] == mask._version and _last_mask[2] == causal:
        return _last_mask[3]
    result = _read_mask(mask, batch, seq, causal)
    _last_mask[:] = [weakref.ref(mask), mask._version, causal, result]
    return result


def _read_mask(mask, batch, seq, causal):
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != (seq, seq):
        return None, f"an attention mask that is not boolean (batch, 1, {seq}, {seq})"
    if mask.shape[0] not in (1, batch):
        return None, f"an attention mask for {mask.shape[0]} sequences in a batch of {batch}"
    m = mask[:, 0].expand(batch, seq, seq)
    pos = torch.arange(seq, device=m.device)
    los, his, oks = [], [], []
    kv_valid = torch.zeros(batch, seq, dtype=torch.bool, device=m.device)
    rows = max(1, _MASK_CHUNK_ELEMENTS // (batch * seq))  # query rows per chunk, bounding the temporaries
    for r0 in range(0, seq, rows):
        part = m[:, r0 : r0 + rows]
        count = part.sum(-1)
        some = count > 0
        lo = torch.where(some, part.to(torch.uint8).argmax(-1), seq)
        hi = torch.where(some, lo + count - 1, -1)
        # contiguous: the True keys of a row are lo .. lo + count - 1, i.e. the last True key is hi
        last = seq - 1 - part.flip(-1).to(torch.uint8).argmax(-1)
        oks.append(((last == hi) | ~some).all())
        los.append(lo)
        his.append(hi)
        kv_valid |= part.any(-2)  # the keys some query attends to: their K/V set the scales
    lo, hi = torch.cat(los, 1), torch.cat(his, 1)
    contiguous = torch.stack(oks).all()
    plain = ((lo == 0) & (hi == (pos if causal else seq - 1))).all()
    ok, is_plain, all_valid = torch.stack([contiguous, plain, kv_valid.all()]).tolist()
    if not ok:
        return None, _MASK_REASON
    if is_plain:
        return None, None
    plan = MaskPlan(lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous(), None if all_valid else kv_valid)
    return plan, None


def _unsupported(module, query, key, attention_mask, dropout, kwargs) -> str | None:
    from hf_fp8.kernels.attention import SUPPORTED_HEAD_DIMS

    if attention_mask is not None and torch.compiler.is_compiling():
        return "an attention mask under torch.compile (checking it needs its values)"
    if attention_mask is not None and attention_mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return "an attention mask while a CUDA graph is captured (checking it needs its values)"
    if dropout and getattr(module, "training", True):
        return f"attention dropout {dropout} > 0"
    if query.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {query.shape[-1]} (supported: {SUPPORTED_HEAD_DIMS})"
    if query.shape[2] != key.shape[2]:
        return "query and key lengths differ (KV-cache decoding)"
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window and attention_mask is None:
        # (within the window it changes nothing; beyond it, HF's mask carries it: read as key ranges)
        return _WINDOW_REASON
    if kwargs.get("s_aux") is not None:
        return "attention sinks"
    if query.shape[1] % key.shape[1]:
        return "query heads not a multiple of key/value heads"
    return None


def fp8_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF attention-interface function: q/k/v (B, H|Hk, S, D) -> ((B, S, H, D), None)."""
    reason = _unsupported(module, query, key, attention_mask, dropout, kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plan = None
    if reason is None and attention_mask is not None:
        plan, reason = mask_plan(attention_mask, query.shape[0], query.shape[2], causal)
        window = kwargs.get("sliding_window")
        if reason is None and plan is None and window is not None and key.shape[2] > window:
            reason = _WINDOW_REASON  # a window that matters, and a mask without it: do not guess
    if not torch.compiler.is_compiling():
        from hf_fp8.coverage import count_attention

        count_attention(module, "fp8" if reason is None else reason)
    if reason is not None:
        # (under torch.compile the warning would break the graph: it is given in eager mode only)
        if reason not in _warned and not torch.compiler.is_compiling():
            _warned.add(reason)
            warnings.warn(
                f"hf_fp8 FP8 attention: falling back to BF16 SDPA for {reason} (warned once per reason)",
                UserWarning,
                stacklevel=2,
            )
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    return fp8_attention(query, key, value, causal=causal, scale=scaling, mask=plan), None


def register_attention() -> str:
    """Register ``"hf_fp8"`` with transformers' AttentionInterface (and SDPA's mask function under
    the same name); idempotent. Returns the name to pass as ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, fp8_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _causal_mask_or_none(sdpa_mask))
    return ATTN_IMPLEMENTATION


def _causal_mask_or_none(sdpa_mask):
    """SDPA's mask function, except that a plain causal mask is ``None`` under torch.compile too.

    A plain causal mask: no padding mask given, no sliding window shorter than the keys, keys
    from position 0, as many queries as keys. HF's SDPA path then passes no mask (``is_causal`` does it) in eager mode,
    but while compiling, transformers 5.17 with torch 2.11 (the H100's) materializes the mask,
    which sent every compiled FP8-attention call to the BF16 fallback. Deciding this needs no
    tensor values, so it holds under tracing; anything else goes to ``sdpa_mask`` unchanged.
    """
    from transformers.masking_utils import causal_mask_function

    def mask(*args, **kwargs):
        if not args and kwargs.get("allow_is_causal_skip", True) and kwargs.get("attention_mask") is None:
            q_length = kwargs.get("q_length")
            if q_length is None and kwargs.get("cache_position") is not None:
                q_length = kwargs["cache_position"].shape[0]
            q_offset = kwargs.get("q_offset", 0)
            if (
                kwargs.get("mask_function") is causal_mask_function
                and (kwargs.get("local_size") is None or kwargs.get("kv_length", 0) < kwargs["local_size"])
                and kwargs.get("kv_offset", 0) == 0
                and isinstance(q_offset, int)
                and q_offset == 0
                and q_length is not None
                and q_length == kwargs.get("kv_length")
            ):
                return None
        return sdpa_mask(*args, **kwargs)

    return mask
