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

from .attention_reference import E4M3_MAX, P_SCALE, fp8_attention_reference, head_scales

__all__ = ["quantize_heads", "fp8_attention_fwd", "fp8_attention_reference", "TUNING", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (64, 128)
_LN2 = math.log(2.0)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) on GPUs; benchmarks may override, the library never does.
TUNING: dict[str, tuple[int, int, int, int]] = {"gpu": (64, 64, 4, 3)}  # best of a sweep on the H100 (bench_attention)


@triton.jit
def _cast_heads_kernel(
    x_ptr,
    y_ptr,
    scale_ptr,
    S,
    H,
    sx_b,
    sx_h,
    sx_s,
    sy_b,
    sy_h,
    sy_s,
    sy_d,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    # one program: BLOCK_S tokens of one (batch, head); y may be transposed (sy_d != 1)
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    mask = (s < S)[:, None]
    x = tl.load(x_ptr + b * sx_b + h * sx_h + s[:, None] * sx_s + d[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.clamp(x * tl.load(scale_ptr + bh), -FP8_MAX, FP8_MAX)
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


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def quantize_heads(x: torch.Tensor, *, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, S, D) with unit stride along D -> (E4M3 codes, FP32 scale_inv (B, H)).

    Codes are contiguous (B, H, S, D), or (B, H, D, S) with ``transpose=True``. The per-head
    amax is one torch reduction; scaling, saturation and the cast are one kernel.
    """
    B, H, S, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    scale, scale_inv = head_scales(x)
    shape = (B, H, D, S) if transpose else (B, H, S, D)
    y = torch.empty(shape, dtype=torch.float8_e4m3fn, device=x.device)
    sy_s, sy_d = (1, S) if transpose else (D, 1)
    BLOCK_S = 64
    grid = (triton.cdiv(S, BLOCK_S), B * H)
    _cast_heads_kernel[grid](
        x, y, scale.contiguous(), S, H, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), sy_s, sy_d,
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
    _attn_fwd_kernel[grid](
        q8, k8, v8t, out, lse, q_sinv, k_sinv, v_sinv,
        scale / _LN2, S, H, Hk,
        k8.stride(2), out.stride(0), out.stride(1), out.stride(2),
        D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=causal, P_SCALE_C=P_SCALE, LN2=_LN2,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out, lse
