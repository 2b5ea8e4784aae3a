"""Torch reference (and CPU path) of :mod:`hf_fp8.kernels.attention`'s FP8 attention numerics.

Same quantization as the kernel: Q scaled per row (one scale per token and head, so each
row's amax maps to E4M3's 448), K and V per (batch, head),
cast to E4M3 (round to nearest even, saturating finite values, NaN for inf/NaN inputs); softmax statistics in FP32; P scaled by
``P_SCALE`` (P <= 1 maps to <= 448), cast to E4M3, multiplied with V's codes.
The one difference from the kernel: the kernel rounds P against the running row maximum of
its online softmax (FlashAttention), this reference against the final row maximum; both are
the same where a row's maximum is in its first key block and differ by one E4M3 rounding
of some P values otherwise.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "key_ranges_from_padding",
    "keep_from_ranges",
    "P_SCALE",
    "E4M3_MAX",
    "head_scales",
    "quantize_heads_reference",
    "quantize_rows_reference",
    "fp8_attention_reference",
]

E4M3_MAX = 448.0
P_SCALE = 448.0  # P in [0, 1] -> [0, 448]: E4M3's full range, 2^-4 relative precision down to 2^-6 / 448


def _saturate(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y = scaled x saturated to E4M3's range, NaN where x is not finite (E4M3 has no inf)."""
    return torch.where(torch.isfinite(x), y.clamp(-E4M3_MAX, E4M3_MAX), torch.full_like(y, float("nan")))


def _scales(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = amax.float()
    ok = (amax > 0) & torch.isfinite(amax)
    # tensor / tensor divisions: ``448.0 / amax`` would be torch's reciprocal times 448, rounded
    # twice; the kernel divides once with IEEE rounding (div_rn)
    safe = torch.where(ok, amax, torch.ones_like(amax))
    scale = torch.where(ok, torch.full_like(amax, E4M3_MAX) / safe, torch.ones_like(amax))
    return scale, torch.ones_like(scale) / scale


def head_scales(x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(batch, head) scale and its inverse for x (B, H, S, D): 448 / amax, guarded like the
    linear layers' scales (zero, inf or NaN amax gives scale 1). ``valid`` (B, S) bool: the amax
    over those tokens only (key padding)."""
    a = x.detach().abs()
    if valid is not None:
        a = a.masked_fill(~valid[:, None, :, None], 0.0)
    # NaN counts as inf (the kernel's rule), whatever amax's NaN propagation
    return _scales(torch.where(torch.isnan(a), torch.full_like(a, float("inf")), a).amax(dim=(2, 3)))


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, S, D) -> (E4M3 codes (B, H, S, D), FP32 scale_inv (B, H, S)): one scale per row."""
    scale, scale_inv = _scales(x.detach().abs().amax(dim=-1))
    y = _saturate(x, x.float() * scale[..., None])
    return y.to(torch.float8_e4m3fn), scale_inv


def quantize_heads_reference(x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, S, D) -> (E4M3 codes (B, H, S, D), FP32 scale_inv (B, H)); ``valid`` as in :func:`head_scales`."""
    scale, scale_inv = head_scales(x, valid)
    y = _saturate(x, x.float() * scale[:, :, None, None])
    return y.to(torch.float8_e4m3fn), scale_inv


def key_ranges_from_padding(kv_valid: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query key ranges (lo, hi), int32 (B, S), of attention over one contiguous run of real
    tokens per row (left or right padding), causal or not: a query attends to the real keys
    (at or before it if causal). Queries with none get the empty range (S, -1)."""
    B, S = kv_valid.shape
    pos = torch.arange(S, device=kv_valid.device)
    count = kv_valid.sum(-1, keepdim=True)
    first = torch.where(count > 0, kv_valid.int().argmax(-1, keepdim=True), S)
    last = first + count - 1
    if not torch.equal(kv_valid, (pos >= first) & (pos <= last)):
        raise ValueError("key padding must mark one contiguous run of real tokens per row (left or right padding)")
    lo = first.expand(B, S)
    hi = torch.minimum(last, pos) if causal else last.expand(B, S)
    empty = hi < lo
    lo, hi = torch.where(empty, S, lo), torch.where(empty, -1, hi)
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


def keep_from_ranges(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) bool from per-query key ranges: query i attends to keys lo[i]..hi[i]."""
    pos = torch.arange(lo.shape[-1], device=lo.device)
    return ((pos >= lo[..., None]) & (pos <= hi[..., None]))[:, None]


def _ste(x: torch.Tensor, quantized_value: torch.Tensor) -> torch.Tensor:
    """Forward: the quantized value; backward: identity (straight-through), like the GPU path,
    whose backward differentiates the unquantized attention."""
    return x + (quantized_value - x).detach()


def fp8_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
    kv_valid: torch.Tensor | None = None,
    key_ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """FP8 attention of q (B, H, S, D), k/v (B, Hk, S, D) (GQA when Hk < H); returns (B, S, H, D)
    in q's dtype. Differentiable (straight-through quantization); ``compute_dtype=float64`` gives
    the exact value of the quantized function. ``kv_valid`` and ``key_ranges`` as in the kernel
    (``fp8_attention_fwd``): K/V scales from the valid tokens, each query's keys from its range,
    output 0 for a query with none."""
    B, H, S, D = q.shape
    Hk = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    deq = []
    for t, per_row in ((q, True), (k, False), (v, False)):
        codes, scale_inv = quantize_rows_reference(t) if per_row else quantize_heads_reference(t, kv_valid)
        scale_inv = scale_inv[..., None] if per_row else scale_inv[:, :, None, None]
        deq.append(_ste(t.to(compute_dtype), codes.to(compute_dtype) * scale_inv.to(compute_dtype)))
    qd, kd, vd = deq
    if Hk != H:
        kd = kd.repeat_interleave(H // Hk, dim=1)
        vd = vd.repeat_interleave(H // Hk, dim=1)
    s = (qd @ kd.transpose(-1, -2)) * scale
    if key_ranges is None and kv_valid is not None:
        key_ranges = key_ranges_from_padding(kv_valid, causal)
    if key_ranges is not None:
        keep = keep_from_ranges(*key_ranges)
    else:
        keep = torch.ones(S, S, dtype=torch.bool, device=q.device)
        keep = keep.tril() if causal else keep
    # a query with no key to attend to (left padding): finite scores, output 0 below
    seen = keep.any(dim=-1, keepdim=True)
    s = s.masked_fill(~keep, float("-inf")).masked_fill(~seen, 0.0)
    m = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)  # noqa: E741  (FP32 sum of the unquantized P, as in the kernel)
    p8 = (p.float() * P_SCALE).to(torch.float8_e4m3fn).to(compute_dtype) / P_SCALE  # P is FP32 in the kernel
    out = ((_ste(p, p8) @ vd) / l).masked_fill(~seen, 0.0)
    return out.transpose(1, 2).to(q.dtype)
