"""FP8 flash attention forward (Triton): Q, K, V in E4M3 with per-(batch, head) scales, P.V in
FP8, softmax statistics in FP32.

Layouts. Inputs are HF's q (B, H, S, D), k and v (B, Hk, S, D), any strides with unit stride
along D (``q_proj(x).view(B, S, H, D).transpose(1, 2)`` needs no copy). One cast kernel per
operand scales and converts to E4M3 and writes the layout the FP8 tensor cores want: Q and K
row-major (B, H, S, D), V transposed (B, Hk, D, S) so that both operands of P.V are K-major
(Hopper's FP8 MMA reads only K-major operands). The output is written as (B, S, H, D), the
layout HF's attention interface returns, in the input dtype; the log-sum-exp (natural log,
FP32, (B, H, S)) is kept for the backward.

Numerics: S = (Q8 K8ᵀ) * sq * sk * softmax_scale in FP32; online softmax (FlashAttention-2)
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
import os

import torch
import triton
import triton.language as tl

from .attention_reference import E4M3_MAX, P_SCALE, fp8_attention_reference

__all__ = ["quantize_heads", "fp8_attention_fwd", "fp8_attention_reference", "TUNING", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (64, 128)
_LN2 = math.log(2.0)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) on GPUs; benchmarks may override, the library never does.
# Hopper's bulk tensor copies for Q, K, Vᵀ (when S % 16 == 0); benchmarks compare both kernels.
USE_TMA = True
TUNING: dict[str, tuple[int, int, int, int]] = {"gpu": (64, 64, 4, 3)}  # best of a sweep on the H100 (bench_attention)


@triton.jit
def _head_amax_kernel(x_ptr, amax_ptr, S, H, sx_b, sx_h, sx_s, D: tl.constexpr, BLOCK_S: tl.constexpr):
    # per-(batch, head) max|x| by atomic max of tile maxima; NaN counts as inf (the scale guard
    # then gives scale 1, as for inf)
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    x = tl.load(x_ptr + b * sx_b + h * sx_h + s[:, None] * sx_s + d[None, :], mask=(s < S)[:, None], other=0.0)
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
    y = tl.clamp(x * scale, -FP8_MAX, FP8_MAX)
    tl.store(y_ptr + b * sy_b + h * sy_h + s[:, None] * sy_s + d[None, :] * sy_d, y.to(tl.float8e4nv), mask=mask)


@triton.jit
def _attn_block(
    acc, m_i, l_i, q, k_base, v_base, offs_m, lo, hi, S, sk_s, qk_scale,
    D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_DIAGONAL: tl.constexpr, P_SCALE_C: tl.constexpr,
):  # fmt: skip
    d = tl.arange(0, D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        in_range = cols < S
        k = tl.load(k_base + cols[:, None] * sk_s + d[None, :], mask=in_range[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units
        keep = in_range[None, :]
        if MASK_DIAGONAL:
            keep = keep & (offs_m[:, None] >= cols[None, :])
        qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + d[None, :] * S + cols[:, None], mask=in_range[:, None], other=0.0)  # (BLOCK_N, D)
        acc = tl.dot((p * P_SCALE_C).to(tl.float8e4nv), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, vt_ptr, o_ptr, lse_ptr, q_sinv_ptr, k_sinv_ptr, v_sinv_ptr,
    softmax_scale_log2, S, H, HK,
    sk_s, so_b, so_s, so_h,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    P_SCALE_C: tl.constexpr, LN2: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // (H // HK)
    bhk = b * HK + hk
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    row_ok = offs_m < S
    # Q, K: contiguous (B, H|Hk, S, D) FP8; Vᵀ: contiguous (B, Hk, D, S) FP8
    q = tl.load(q_ptr + bh * S * D + offs_m[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = k_ptr + bhk * S * D
    v_base = vt_ptr + bhk * D * S
    qk_scale = tl.load(q_sinv_ptr + bh) * tl.load(k_sinv_ptr + bhk) * softmax_scale_log2
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if CAUSAL:
        # key blocks strictly before this query block: no mask; then the diagonal block
        acc, m_i, l_i = _attn_block(
            acc, m_i, l_i, q, k_base, v_base, offs_m, 0, start_m * BLOCK_M, S, sk_s, qk_scale,
            D, BLOCK_N, False, P_SCALE_C,
        )  # fmt: skip
        acc, m_i, l_i = _attn_block(
            acc, m_i, l_i, q, k_base, v_base, offs_m, start_m * BLOCK_M, (start_m + 1) * BLOCK_M, S, sk_s,
            qk_scale, D, BLOCK_N, True, P_SCALE_C,
        )  # fmt: skip
    else:
        acc, m_i, l_i = _attn_block(
            acc, m_i, l_i, q, k_base, v_base, offs_m, 0, S, S, sk_s, qk_scale, D, BLOCK_N, False, P_SCALE_C
        )  # fmt: skip
    out = acc * (tl.load(v_sinv_ptr + bhk) / P_SCALE_C) / l_i[:, None]
    o_offs = b * so_b + offs_m[:, None] * so_s + h * so_h + d[None, :]
    tl.store(o_ptr + o_offs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + bh * S + offs_m, (m_i + tl.math.log2(l_i)) * LN2, mask=row_ok)


@triton.jit
def _attn_block_tma(
    acc, m_i, l_i, q, desc_k, desc_v, bh_k, offs_m, lo, hi, S, qk_scale,
    D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_DIAGONAL: tl.constexpr, P_SCALE_C: tl.constexpr,
):  # fmt: skip
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = desc_k.load([bh_k, start_n, 0]).reshape(BLOCK_N, D)  # rows past S come back as zeros
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        keep = (cols < S)[None, :]
        if MASK_DIAGONAL:
            keep = keep & (offs_m[:, None] >= cols[None, :])
        qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = desc_v.load([bh_k, 0, start_n]).reshape(D, BLOCK_N)  # a (D, BLOCK_N) tile of Vᵀ
        acc = tl.dot((p * P_SCALE_C).to(tl.float8e4nv), tl.trans(v), acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel_tma(
    desc_q, desc_k, desc_v, o_ptr, lse_ptr, q_sinv_ptr, k_sinv_ptr, v_sinv_ptr,
    softmax_scale_log2, S, H, HK, so_b, so_s, so_h,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    P_SCALE_C: tl.constexpr, LN2: tl.constexpr,
):  # fmt: skip
    # Same algorithm as _attn_fwd_kernel, with Hopper's bulk tensor copies (TMA) for Q, K, Vᵀ
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bhk = b * HK + h // (H // HK)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    q = desc_q.load([bh, start_m * BLOCK_M, 0]).reshape(BLOCK_M, D)
    qk_scale = tl.load(q_sinv_ptr + bh) * tl.load(k_sinv_ptr + bhk) * softmax_scale_log2
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if CAUSAL:
        acc, m_i, l_i = _attn_block_tma(
            acc, m_i, l_i, q, desc_k, desc_v, bhk, offs_m, 0, start_m * BLOCK_M, S, qk_scale,
            D, BLOCK_N, False, P_SCALE_C,
        )  # fmt: skip
        acc, m_i, l_i = _attn_block_tma(
            acc, m_i, l_i, q, desc_k, desc_v, bhk, offs_m, start_m * BLOCK_M, (start_m + 1) * BLOCK_M, S,
            qk_scale, D, BLOCK_N, True, P_SCALE_C,
        )  # fmt: skip
    else:
        acc, m_i, l_i = _attn_block_tma(
            acc, m_i, l_i, q, desc_k, desc_v, bhk, offs_m, 0, S, S, qk_scale, D, BLOCK_N, False, P_SCALE_C
        )  # fmt: skip
    out = acc * (tl.load(v_sinv_ptr + bhk) / P_SCALE_C) / l_i[:, None]
    row_ok = offs_m < S
    o_offs = b.to(tl.int64) * so_b + offs_m[:, None] * so_s + h * so_h + d[None, :]
    tl.store(o_ptr + o_offs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + bh.to(tl.int64) * S + offs_m, (m_i + tl.math.log2(l_i)) * LN2, mask=row_ok)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def quantize_heads(x: torch.Tensor, *, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, S, D) with unit stride along D -> (E4M3 codes, FP32 scale_inv (B, H)).

    Codes are contiguous (B, H, S, D), or (B, H, D, S) with ``transpose=True``. Two kernels:
    per-head amax (atomic max of tile maxima), then scale, saturate and cast.
    """
    B, H, S, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    amax = torch.zeros(B * H, dtype=torch.float32, device=x.device)
    scale_inv = torch.empty(B, H, dtype=torch.float32, device=x.device)
    shape = (B, H, D, S) if transpose else (B, H, S, D)
    y = torch.empty(shape, dtype=torch.float8_e4m3fn, device=x.device)
    sy_s, sy_d = (1, S) if transpose else (D, 1)
    BLOCK_S = 64
    grid = (triton.cdiv(S, BLOCK_S), B * H)
    _head_amax_kernel[grid](x, amax, S, H, x.stride(0), x.stride(1), x.stride(2), D=D, BLOCK_S=BLOCK_S)
    _cast_heads_kernel[grid](
        x, y, amax, scale_inv, S, H, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), sy_s, sy_d,
        D=D, BLOCK_S=BLOCK_S, FP8_MAX=E4M3_MAX,
    )  # fmt: skip
    return y, scale_inv


def fp8_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 attention forward: q (B, H, S, D), k/v (B, Hk, S, D) -> (out (B, S, H, D) in q's dtype,
    log-sum-exp (B, H, S) FP32, natural log). Callers check shapes (see ``integrations.attention``)."""
    B, H, S, D = q.shape
    Hk = k.shape[1]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"fp8_attention_fwd: head_dim {D} not supported (supported: {SUPPORTED_HEAD_DIMS})")
    if H % Hk:
        raise ValueError(f"fp8_attention_fwd: {H} query heads is not a multiple of {Hk} key/value heads")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q8, q_sinv = quantize_heads(q)
    k8, k_sinv = quantize_heads(k)
    v8t, v_sinv = quantize_heads(v, transpose=True)
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    if _interpret():
        BLOCK_M, BLOCK_N, num_warps, num_stages = 32, 32, 1, 1  # the interpreter pays per program and per loop trip
    else:
        BLOCK_M, BLOCK_N, num_warps, num_stages = TUNING["gpu"]
    grid = (triton.cdiv(S, BLOCK_M), B * H)
    common = dict(D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=causal, P_SCALE_C=P_SCALE, LN2=_LN2)
    if USE_TMA and S % 16 == 0:  # TMA needs 16-byte aligned strides (Vᵀ rows are S bytes)
        from triton.tools.tensor_descriptor import TensorDescriptor

        desc_q = TensorDescriptor(q8, [B * H, S, D], [S * D, D, 1], [1, BLOCK_M, D])
        desc_k = TensorDescriptor(k8, [B * Hk, S, D], [S * D, D, 1], [1, BLOCK_N, D])
        desc_v = TensorDescriptor(v8t, [B * Hk, D, S], [D * S, S, 1], [1, D, BLOCK_N])
        _attn_fwd_kernel_tma[grid](
            desc_q, desc_k, desc_v, out, lse, q_sinv, k_sinv, v_sinv, scale / _LN2, S, H, Hk,
            out.stride(0), out.stride(1), out.stride(2), num_warps=num_warps, num_stages=num_stages, **common,
        )  # fmt: skip
    else:
        _attn_fwd_kernel[grid](
            q8, k8, v8t, out, lse, q_sinv, k_sinv, v_sinv, scale / _LN2, S, H, Hk,
            k8.stride(2), out.stride(0), out.stride(1), out.stride(2), num_warps=num_warps, num_stages=num_stages,
            **common,
        )  # fmt: skip
    return out, lse
