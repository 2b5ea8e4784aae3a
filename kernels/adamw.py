"""One-pass AdamW step for one tensor: FP32 update, stochastic BF16 write-back of the weight.

Per element (decoupled weight decay, bias-corrected moments)::

    p  <- p * (1 - lr * wd)
    m  <- beta1 * m + (1 - beta1) * g
    v  <- beta2 * v + (1 - beta2) * g^2
    p  <- p - lr * (m / bc1) / (sqrt(v / bc2) + eps)
    BF16 p: add 16 random bits below BF16's last mantissa bit and truncate, i.e. round up
            with probability equal to the dropped fraction.

Stochastic rounding draws its random bits from an integer hash of each element's index under a
per-step key (``random_bits``): unbiased like any uniform bits, five integer operations per draw
where Philox made the step compute-bound, and the torch path computes the very same bits.

The moments are FP32, or BF16 (``torch.optim.AdamW``'s states for BF16 parameters): loaded
into FP32, updated, and rounded once when stored: to nearest, as torch's fused AdamW does, or,
with stochastic rounding, stochastically like the weight (round to nearest freezes a BF16
``exp_avg_sq``: ``0.999 * v`` is within half an ulp of ``v`` and rounds back to it).

Memory traffic for BF16 parameters and gradients: 2 + 2 + 4 + 4 bytes read and 2 + 4 + 4
written per element with FP32 moments, 14 bytes with BF16 moments, in one pass.
``torch.optim.AdamW(fused=True)`` moves the same 14 bytes for BF16 parameters, but its
multi-tensor launches cover at most a few hundred 64K-element chunks each (134 launches for an
8-layer Llama-3-8B-shaped model): 20.3 ms per step on the H100, ~1.9 TB/s
(``benchmarks/results/history/llama_profile_norm_h100.json``). Here each tensor is one launch whose grid
covers the whole tensor (``benchmarks/bench_adamw.py`` measures both side by side).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, interpreting, launch
from .adamw_reference import random_bits, random_keys

__all__ = ["adamw_step", "random_bits", "random_keys"]

# Elements per program and warps per launch on the GPU (a bandwidth-bound stream: each program
# moves BLOCK elements of four tensors; benchmarks/bench_adamw.py sweeps both).
BLOCK = 2048
NUM_WARPS = 8


@triton.jit
def _stochastic_bf16(x, r):
    """FP32 ``x`` moved to a BF16 value (still FP32): the low 16 bits of ``r`` added below BF16's
    last mantissa bit, then truncated, i.e. rounded away from zero with probability equal to the
    dropped fraction (unbiased, for either sign). Non-finite values keep round-to-nearest."""
    bits = x.to(tl.int32, bitcast=True) + (r & 0xFFFF).to(tl.int32)
    rounded = (bits & -65536).to(tl.float32, bitcast=True)
    ok = (tl.abs(x) < float("inf")) & (tl.abs(rounded) < float("inf"))
    return tl.where(ok, rounded, x)


@triton.jit
def _hash32(x):
    """A 32-bit integer hash with full avalanche ("lowbias32", C. Wellons' hash prospector):
    five integer ops per call, against Philox's ~10 rounds, which made the step compute-bound
    (benchmarks/results/history/adamw_rng_probe_h100.json: stochastic rounding of weight and moments
    with tl.randint4x per element 6.67 ms per 2^30 elements, with two hashes 5.12, nearest 5.00)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


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
    key_pm,  # this step's keys of the random bits (random_keys), passed as int32 bits
    key_v,
    STOCHASTIC: tl.constexpr,
    STATES_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = p * decay
    m = m * beta1 + g * (1.0 - beta1)
    v = v * beta2 + g * g * (1.0 - beta2)
    denom = tl.sqrt_rn(tl.math.div_rn(v, tl.full(v.shape, bc2, tl.float32))) + eps
    p = p - tl.math.div_rn(lr * tl.math.div_rn(m, tl.full(m.shape, bc1, tl.float32)), denom)
    if STOCHASTIC:
        # per element: 16 random bits for the weight and 16 for exp_avg from one hash of its index
        # under this step's key, 16 for exp_avg_sq from one under a second key (see random_bits)
        i = offs.to(tl.uint32)
        key_pm = key_pm.to(tl.uint32, bitcast=True)
        key_v = key_v.to(tl.uint32, bitcast=True)
        r = _hash32(i ^ key_pm)
        p = _stochastic_bf16(p, r)
        if STATES_BF16:
            m = _stochastic_bf16(m, r >> 16)
            v = _stochastic_bf16(v, _hash32(i ^ key_v))
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)  # FP32, or BF16 (exact if rounded above)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
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
    """In place on ``p`` (FP32/BF16/FP16; stochastic rounding for BF16), ``m`` and ``v`` (both FP32
    or both BF16; with ``stochastic_rounding`` BF16 moments are rounded stochastically too)."""
    for name, t in (("g", g), ("m", m), ("v", v)):
        if t.shape != p.shape:
            raise ValueError(f"adamw_step: {name} has shape {tuple(t.shape)}, parameter {tuple(p.shape)}")
    if m.dtype != v.dtype or m.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"adamw_step: moments must be both float32 or both bfloat16, got {m.dtype} and {v.dtype}")
    if stochastic_rounding and p.dtype != torch.bfloat16:
        raise ValueError(f"adamw_step: stochastic rounding in the kernel is for bfloat16 parameters, got {p.dtype}")
    if not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
        raise ValueError("adamw_step: parameter, gradient and moments must be contiguous")
    n = p.numel()
    interp = interpreting()
    block = 65536 if interp else BLOCK
    launch(
        _adamw_kernel,
        (cdiv(n, block),),
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
            *(k - (1 << 32) if k >= 1 << 31 else k for k in random_keys(seed)),  # as int32: one specialization
        ),
        dict(STOCHASTIC=stochastic_rounding, STATES_BF16=m.dtype == torch.bfloat16, BLOCK=block),
        NUM_WARPS if not interp else 1,
    )
