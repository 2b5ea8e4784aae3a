"""One-pass AdamW step for one tensor: FP32 moments, FP32 update, stochastic BF16 write-back.

Per element (decoupled weight decay, bias-corrected moments)::

    p  <- p * (1 - lr * wd)
    m  <- beta1 * m + (1 - beta1) * g
    v  <- beta2 * v + (1 - beta2) * g^2
    p  <- p - lr * (m / bc1) / (sqrt(v / bc2) + eps)
    BF16 p: add 16 random bits (Philox, seeded per step) below BF16's last mantissa bit and
            truncate, i.e. round up with probability equal to the dropped fraction.

Memory traffic for BF16 parameters and gradients: 2 + 2 + 4 + 4 bytes read and 2 + 4 + 4
written per element, in one pass; ``torch.optim.AdamW(fused=True)`` on BF16 parameters
moves 14 bytes per element but keeps BF16 moments.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._launch import launch

__all__ = ["adamw_step"]


@triton.jit
def _adamw_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    n,
    lr,
    beta1,
    beta2,
    eps,
    decay,  # 1 - lr * weight_decay
    bc1,
    bc2,
    seed,
    STOCHASTIC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p = p * decay
    m = m * beta1 + g * (1.0 - beta1)
    v = v * beta2 + g * g * (1.0 - beta2)
    denom = tl.sqrt_rn(tl.math.div_rn(v, tl.full(v.shape, bc2, tl.float32))) + eps
    p = p - tl.math.div_rn(lr * tl.math.div_rn(m, tl.full(m.shape, bc1, tl.float32)), denom)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if STOCHASTIC:
        r = tl.randint(seed, offs.to(tl.int32))
        bits = p.to(tl.int32, bitcast=True) + (r & 0xFFFF).to(tl.int32)
        rounded = (bits & -65536).to(tl.float32, bitcast=True)
        ok = (tl.abs(p) < float("inf")) & (tl.abs(rounded) < float("inf"))
        p = tl.where(ok, rounded, p)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


def adamw_step(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction1: float,
    bias_correction2: float,
    stochastic_rounding: bool,
    seed: int,
) -> None:
    """In place on ``p`` (FP32/BF16/FP16; stochastic rounding for BF16), ``m`` and ``v`` (FP32)."""
    for name, t in (("g", g), ("m", m), ("v", v)):
        if t.shape != p.shape:
            raise ValueError(f"adamw_step: {name} has shape {tuple(t.shape)}, parameter {tuple(p.shape)}")
    if m.dtype != torch.float32 or v.dtype != torch.float32:
        raise TypeError(f"adamw_step: moments must be float32, got {m.dtype} and {v.dtype}")
    if stochastic_rounding and p.dtype != torch.bfloat16:
        raise ValueError(f"adamw_step: stochastic rounding in the kernel is for bfloat16 parameters, got {p.dtype}")
    if not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
        raise ValueError("adamw_step: parameter, gradient and moments must be contiguous")
    n = p.numel()
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    BLOCK = 65536 if interp else 2048
    launch(
        _adamw_kernel,
        (triton.cdiv(n, BLOCK),),
        (
            p,
            g,
            m,
            v,
            n,
            lr,
            beta1,
            beta2,
            eps,
            1.0 - lr * weight_decay,
            bias_correction1,
            bias_correction2,
            seed,
        ),
        dict(STOCHASTIC=stochastic_rounding, BLOCK=BLOCK),
        8 if not interp else 1,
    )
