"""FP8 flash attention forward (Triton): Q, K, V in E4M3, P.V in FP8, softmax statistics in FP32.

Scales. Q gets one scale per row (token and head): it factors out of Q Kᵀ as a row
multiplier, needs no pass over the whole head first, and follows outlier tokens more closely
than one scale per head. K and V get one scale per (batch, head): K's as a scalar on Q Kᵀ
(a per-key scale would cost a column multiply of every score tile, measured 15% slower), V's
because it must factor out of the sum over tokens in P V.

Passes. Q is read once, in the attention kernel itself, which casts each query tile to E4M3
with its row scales (Q, the largest operand under GQA, is never written back in FP8). K and
V each take an amax pass and a cast pass; V's writes it transposed, (B, Hk, D, S), so that
both operands of P.V are K-major (Hopper's FP8 MMA reads only K-major operands). K and Vᵀ tiles are read by bulk tensor copies (TMA) where
the shapes allow, by pointer loads otherwise (same arithmetic, same results).

Layouts. Inputs are HF's q (B, H, S, D), k and v (B, Hk, S, D), any strides with unit stride
along D (``q_proj(x).view(B, S, H, D).transpose(1, 2)`` needs no copy). The output is written
as (B, S, H, D), the layout HF's attention interface returns, in the input dtype; the
log-sum-exp (natural log, FP32, (B, H, S)) is kept for the backward.

Numerics: S = (Q8 K8ᵀ) * sq_i * sk_j * softmax_scale in FP32; online softmax (FlashAttention-2)
in base 2; P in [0, 1] is scaled by ``P_SCALE`` = 448 and cast to E4M3; O = Σ P8 V8 in FP32,
divided by the FP32 row sum and rescaled once at the end. See ``attention_reference`` for the
torch version of the same function.

Causal attention splits each query block's key loop in two, like the Triton tutorial's
fused attention: blocks strictly below the diagonal need no mask, the diagonal block does.

References: FlashAttention-2 (Dao 2023); FlashAttention-3's FP8 forward (Shah et al. 2024);
Triton's fused-attention tutorial (for the K-major V layout FP8 MMA needs).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import cdiv, interpreting, launch
from .attention_reference import E4M3_MAX, P_SCALE, fp8_attention_reference, key_ranges_from_padding

__all__ = [
    "key_ranges_from_padding",
    "quantize_heads",
    "quantize_rows",
    "fp8_attention_fwd",
    "fp8_attention_reference",
    "TUNING",
    "SUPPORTED_HEAD_DIMS",
]

SUPPORTED_HEAD_DIMS = (64, 128)
_LN2 = math.log(2.0)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) on GPUs; benchmarks may override, the library never does.
# Hopper's bulk tensor copies for Q, K, Vᵀ (when S % 16 == 0); benchmarks compare both kernels.
USE_TMA = True
TUNING: dict[str, tuple[int, int, int, int]] = {"gpu": (64, 64, 4, 3)}  # best of a sweep on the H100 (bench_attention)


@triton.jit
def _saturate(x, y, FP8_MAX: tl.constexpr):
    """Scaled values y of x, saturated to E4M3's range; NaN where x is inf or NaN (E4M3 has no
    inf), as the linear layers' casts do. Explicit because min/max NaN semantics differ between
    GPUs and Triton versions' interpreters."""
    return tl.where(tl.abs(x) < float("inf"), tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX), float("nan"))


@triton.jit
def _row_scales(x, FP8_MAX: tl.constexpr):
    """(R, D) FP32 tile -> (scale (R,), scale_inv (R,)): 448 / row amax, guarded (zero, inf or
    NaN amax gives 1), correctly rounded divisions like the torch reference."""
    a = tl.abs(x)
    amax = tl.max(tl.where(a != a, float("inf"), a), 1)
    ok = (amax > 0) & (amax < float("inf"))
    scale = tl.where(ok, tl.math.div_rn(tl.full(amax.shape, FP8_MAX, tl.float32), tl.where(ok, amax, 1.0)), 1.0)
    return scale, tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), scale)


@triton.jit
def _cast_rows_kernel(
    x_ptr, y_ptr, scale_inv_ptr, S, H, sx_b, sx_h, sx_s,
    D: tl.constexpr, BLOCK_S: tl.constexpr, FP8_MAX: tl.constexpr,
):  # fmt: skip
    # one program: BLOCK_S rows of one (batch, head) -> contiguous (B, H, S, D) E4M3 + (B, H, S) scale_inv
    pid_s = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    mask = s < S
    x = tl.load(x_ptr + b * sx_b + h * sx_h + s[:, None] * sx_s + d[None, :], mask=mask[:, None], other=0.0)
    scale, scale_inv = _row_scales(x.to(tl.float32), FP8_MAX)
    y = _saturate(x.to(tl.float32), x.to(tl.float32) * scale[:, None], FP8_MAX)
    tl.store(y_ptr + bh * S * D + s[:, None] * D + d[None, :], y.to(tl.float8e4nv), mask=mask[:, None])
    tl.store(scale_inv_ptr + bh * S + s, scale_inv, mask=mask)


@triton.jit
def _head_amax_kernel(
    x_ptr, amax_ptr, valid_ptr, S, H, sx_b, sx_h, sx_s,
    D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_PAD: tl.constexpr,
):  # fmt: skip
    # per-(batch, head) max|x| by atomic max of tile maxima; NaN counts as inf (the scale guard
    # then gives scale 1, as for inf). With key padding, over the real tokens only: padding's
    # values must not change the scale the real tokens get.
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    rows = s < S
    if HAS_PAD:
        rows = rows & (tl.load(valid_ptr + b * S + s, mask=s < S, other=0) != 0)
    x = tl.load(x_ptr + b * sx_b + h * sx_h + s[:, None] * sx_s + d[None, :], mask=rows[:, None], other=0.0)
    a = tl.abs(x.to(tl.float32))
    a = tl.where(a != a, float("inf"), a)
    tl.atomic_max(amax_ptr + bh, tl.max(tl.max(a, 1), 0))


@triton.jit
def _cast_heads_kernel(
    x_ptr, y_ptr, amax_ptr, scale_inv_ptr, S, H,
    sx_b, sx_h, sx_s, sy_b, sy_h, sy_s, sy_d,
    D: tl.constexpr, BLOCK_S: tl.constexpr, FP8_MAX: tl.constexpr,
):  # fmt: skip
    # one program: BLOCK_S tokens of one (batch, head); y may be transposed (sy_d != 1)
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    amax = tl.load(amax_ptr + bh)
    ok = (amax > 0) & (amax < float("inf"))
    # correctly rounded divisions (div_rn), as torch computes them: bit-exact against the reference
    scale = tl.where(ok, tl.math.div_rn(tl.full([], FP8_MAX, tl.float32), tl.where(ok, amax, 1.0)), 1.0)
    if pid_s == 0:
        tl.store(scale_inv_ptr + bh, tl.math.div_rn(tl.full([], 1.0, tl.float32), scale))
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    mask = (s < S)[:, None]
    x = tl.load(x_ptr + b * sx_b + h * sx_h + s[:, None] * sx_s + d[None, :], mask=mask, other=0.0).to(tl.float32)
    y = _saturate(x, x * scale, FP8_MAX)
    tl.store(y_ptr + b * sy_b + h * sy_h + s[:, None] * sy_s + d[None, :] * sy_d, y.to(tl.float8e4nv), mask=mask)


@triton.jit
def _attn_inner(
    acc, m_i, l_i, q8, q_row_scale, k_ptr, vt_ptr, desc_k, desc_v, row_lo, row_hi, bhk, offs_m, lo, hi, S,
    D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_DIAGONAL: tl.constexpr, P_SCALE_C: tl.constexpr,
    USE_TMA: tl.constexpr, HAS_RANGES: tl.constexpr,
):  # fmt: skip
    d = tl.arange(0, D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        in_range = cols < S
        if USE_TMA:
            k = desc_k.load([bhk.to(tl.int32), start_n, 0]).reshape(BLOCK_N, D)  # rows past S come back as zeros
        else:
            k = tl.load(k_ptr + bhk * S * D + cols[:, None] * D + d[None, :], mask=in_range[:, None], other=0.0)
        qk = tl.dot(q8, tl.trans(k)) * q_row_scale[:, None]  # log2 units
        keep = in_range[None, :]
        if MASK_DIAGONAL:
            keep = keep & (offs_m[:, None] >= cols[None, :])
        if HAS_RANGES:
            keep = keep & (cols[None, :] >= row_lo[:, None]) & (cols[None, :] <= row_hi[:, None])
        qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = m_new
        if HAS_RANGES:
            # a row may have met no key of its range yet: subtract 0 instead of -inf, which keeps
            # its (zero) sums free of NaN; its maximum stays -inf
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_sub)
        p = tl.math.exp2(qk - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_TMA:
            v = tl.trans(desc_v.load([bhk.to(tl.int32), 0, start_n]).reshape(D, BLOCK_N))  # a (D, BLOCK_N) tile of Vᵀ
        else:
            v = tl.load(vt_ptr + bhk * D * S + d[None, :] * S + cols[:, None], mask=in_range[:, None], other=0.0)
        acc = tl.dot((p * P_SCALE_C).to(tl.float8e4nv), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, vt_ptr, desc_k, desc_v, lo_ptr, hi_ptr, o_ptr, lse_ptr, k_sinv_ptr, v_sinv_ptr,
    softmax_scale_log2, S, H, HK, sq_b, sq_h, sq_s, so_b, so_s, so_h,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    P_SCALE_C: tl.constexpr, LN2: tl.constexpr, FP8_MAX: tl.constexpr, USE_TMA: tl.constexpr,
    HAS_RANGES: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    bhk = b * HK + h // (H // HK)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    row_ok = offs_m < S
    # the query tile, cast to E4M3 here with one scale per row
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + d[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(tl.float32)
    q_scale, q_sinv = _row_scales(q, FP8_MAX)
    q8 = _saturate(q, q * q_scale[:, None], FP8_MAX).to(tl.float8e4nv)
    q_row_scale = q_sinv * (tl.load(k_sinv_ptr + bhk) * softmax_scale_log2)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if HAS_RANGES:
        # each query attends to the keys lo..hi of its row (the mask: causal, padding, packed
        # sequences; empty: lo = S, hi = -1): only the key blocks some row of this tile reaches
        row_lo = tl.load(lo_ptr + b * S + offs_m, mask=row_ok, other=S)
        row_hi = tl.load(hi_ptr + b * S + offs_m, mask=row_ok, other=-1)
        first = (tl.min(row_lo, 0) // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _attn_inner(
            acc, m_i, l_i, q8, q_row_scale, k_ptr, vt_ptr, desc_k, desc_v, row_lo, row_hi, bhk, offs_m,
            first, tl.max(row_hi, 0) + 1, S, D, BLOCK_N, False, P_SCALE_C, USE_TMA, True,
        )  # fmt: skip
        # a query with no key to attend to (a left-padding row): output 0 and log-sum-exp +inf,
        # so that a backward fed these gives the row zero probabilities and gradients
        seen = l_i > 0
        out = acc * (tl.load(v_sinv_ptr + bhk) / P_SCALE_C) / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("inf"))
    else:
        if CAUSAL:
            # key blocks strictly before this query block: no mask; then the diagonal block
            acc, m_i, l_i = _attn_inner(
                acc, m_i, l_i, q8, q_row_scale, k_ptr, vt_ptr, desc_k, desc_v, offs_m, offs_m, bhk, offs_m,
                0, start_m * BLOCK_M, S, D, BLOCK_N, False, P_SCALE_C, USE_TMA, False,
            )  # fmt: skip
            acc, m_i, l_i = _attn_inner(
                acc, m_i, l_i, q8, q_row_scale, k_ptr, vt_ptr, desc_k, desc_v, offs_m, offs_m, bhk, offs_m,
                start_m * BLOCK_M, (start_m + 1) * BLOCK_M, S, D, BLOCK_N, True, P_SCALE_C, USE_TMA, False,
            )  # fmt: skip
        else:
            acc, m_i, l_i = _attn_inner(
                acc, m_i, l_i, q8, q_row_scale, k_ptr, vt_ptr, desc_k, desc_v, offs_m, offs_m, bhk, offs_m,
                0, S, S, D, BLOCK_N, False, P_SCALE_C, USE_TMA, False,
            )  # fmt: skip
        out = acc * (tl.load(v_sinv_ptr + bhk) / P_SCALE_C) / l_i[:, None]
        lse = (m_i + tl.math.log2(l_i)) * LN2
    o_offs = b * so_b + offs_m[:, None] * so_s + h * so_h + d[None, :]
    tl.store(o_ptr + o_offs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + bh * S + offs_m, lse, mask=row_ok)


def _interpret() -> bool:
    return interpreting()


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, S, D) with unit stride along D -> (contiguous E4M3 codes, FP32 scale_inv (B, H, S)), one pass."""
    x = _bhsd(x)
    B, H, S, D = x.shape
    y = torch.empty((B, H, S, D), dtype=torch.float8_e4m3fn, device=x.device)
    scale_inv = torch.empty((B, H, S), dtype=torch.float32, device=x.device)
    BLOCK_S = 64
    launch(
        _cast_rows_kernel,
        (cdiv(S, BLOCK_S), B * H),
        (
            x,
            y,
            scale_inv,
            S,
            H,
            x.stride(0),
            x.stride(1),
            x.stride(2),
        ),
        dict(D=D, BLOCK_S=BLOCK_S, FP8_MAX=E4M3_MAX),
        4,
    )
    return y, scale_inv


def quantize_heads(
    x: torch.Tensor, *, transpose: bool = False, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, S, D) with unit stride along D -> (E4M3 codes, FP32 scale_inv (B, H)).

    Codes are contiguous (B, H, S, D), or (B, H, D, S) with ``transpose=True``. Two kernels:
    per-head amax (atomic max of tile maxima), then scale, saturate and cast. ``valid`` (B, S)
    bool: the amax is taken over those tokens only (key padding); every token is cast.
    """
    x = _bhsd(x)
    B, H, S, D = x.shape
    amax = torch.zeros(B * H, dtype=torch.float32, device=x.device)
    scale_inv = torch.empty(B, H, dtype=torch.float32, device=x.device)
    shape = (B, H, D, S) if transpose else (B, H, S, D)
    y = torch.empty(shape, dtype=torch.float8_e4m3fn, device=x.device)
    sy_s, sy_d = (1, S) if transpose else (D, 1)
    BLOCK_S = 64
    grid = (cdiv(S, BLOCK_S), B * H)
    launch(
        _head_amax_kernel,
        grid,
        (x, amax, amax if valid is None else valid, S, H, x.stride(0), x.stride(1), x.stride(2)),
        dict(D=D, BLOCK_S=BLOCK_S, HAS_PAD=valid is not None),  # (amax: an unread stand-in pointer)
        4,
    )
    launch(_cast_heads_kernel, grid, (x, y, amax, scale_inv, S, H, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), sy_s, sy_d,), dict(D=D, BLOCK_S=BLOCK_S, FP8_MAX=E4M3_MAX), 4)  # fmt: skip
    return y, scale_inv


def _valid_bytes(valid: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) key-padding mask as contiguous int8 (1 = a real token) for the kernels' loads."""
    return None if valid is None else valid.to(torch.int8).contiguous()


def fp8_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    kv_valid: torch.Tensor | None = None,
    key_ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 attention forward: q (B, H, S, D), k/v (B, Hk, S, D) -> (out (B, S, H, D) in q's dtype,
    log-sum-exp (B, H, S) FP32, natural log). Callers check shapes (see ``integrations.attention``).

    Masks. ``key_ranges = (lo, hi)``, int (B, S) each: query i of row b attends to keys
    ``lo[b, i] .. hi[b, i]`` (inclusive; ``causal`` is then ignored: the ranges say it), which
    covers causal attention, left or right padding and packed sequences; a query with an empty
    range (lo > hi) gets output 0 and log-sum-exp +inf. ``kv_valid`` (B, S) bool: the tokens
    whose K and V set the scales (padding's values must not move the real tokens'); without
    ``key_ranges``, also key padding itself (one contiguous run of real tokens per row)."""
    B, H, S, D = q.shape
    Hk = k.shape[1]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"fp8_attention_fwd: head_dim {D} not supported (supported: {SUPPORTED_HEAD_DIMS})")
    if H % Hk:
        raise ValueError(f"fp8_attention_fwd: {H} query heads is not a multiple of {Hk} key/value heads")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if kv_valid is not None and kv_valid.shape != (B, S):
        raise ValueError(f"fp8_attention_fwd: kv_valid of shape {tuple(kv_valid.shape)}, expected {(B, S)}")
    if key_ranges is None and kv_valid is not None:
        key_ranges = key_ranges_from_padding(kv_valid, causal)
    if key_ranges is not None:
        if any(tuple(r.shape) != (B, S) for r in key_ranges):
            raise ValueError(f"fp8_attention_fwd: key_ranges must be two {(B, S)} tensors")
        key_ranges = tuple(r.to(device=q.device, dtype=torch.int32).contiguous() for r in key_ranges)
    q = _bhsd(q)
    valid8 = _valid_bytes(kv_valid)
    k8, k_sinv = quantize_heads(k, valid=valid8)
    v8t, v_sinv = quantize_heads(v, transpose=True, valid=valid8)
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    if _interpret():
        BLOCK_M, BLOCK_N, num_warps, num_stages = 32, 32, 1, 1  # the interpreter pays per program and per loop trip
    else:
        BLOCK_M, BLOCK_N, num_warps, num_stages = TUNING["gpu"]
    use_tma = USE_TMA and S % 16 == 0  # TMA needs 16-byte aligned strides (Vᵀ rows are S bytes)
    desc_k = desc_v = None
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        desc_k = TensorDescriptor(k8, [B * Hk, S, D], [S * D, D, 1], [1, BLOCK_N, D])
        desc_v = TensorDescriptor(v8t, [B * Hk, D, S], [D * S, S, 1], [1, D, BLOCK_N])
    grid = (cdiv(S, BLOCK_M), B * H)
    _attn_fwd_kernel[grid](
        q, k8, v8t, desc_k, desc_v, *(key_ranges or (lse, lse)), out, lse, k_sinv, v_sinv, scale / _LN2, S, H, Hk,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=causal, P_SCALE_C=P_SCALE, LN2=_LN2, FP8_MAX=E4M3_MAX,
        USE_TMA=use_tma, HAS_RANGES=key_ranges is not None, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out, lse
