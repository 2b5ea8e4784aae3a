"""Rotary position embedding in FP32: cos/sin computed inside the kernel, one rounding per output.

Math (HF Llama's ``rotate_half`` convention, head_dim D, pairs (i, i + D/2) for i < D/2)::

    angle_i = fp32(pos) * inv_freq_i                       (FP32 product, as HF and Meta compute it)
    c, s    = cos(angle_i) * scaling, sin(angle_i) * scaling      (FP32)
    y_i       = x_i * c - x_{i+D/2} * s
    y_{i+D/2} = x_{i+D/2} * c + x_i * s
    backward: the transpose of the rotation, i.e. the same with s -> -s

Everything after the angle is FP32 and the output is rounded to the input dtype once, so
BF16 q/k come out as the correctly rounded rotation in all but ~1e-4 of elements. Stock HF
instead rounds cos/sin to BF16 and rotates in BF16 (about 2/3 of outputs correctly rounded
at rope_theta=500000). Angles reach ~S radians, so before cos/sin the kernel reduces them to
[-pi, pi] in FP64: accurate whatever the lowering of ``tl.cos``/``tl.sin`` (libdevice or an
approximate instruction), and on the CPU interpreter, which has no fused multiply-add.

Layout: q (B, S, Hq, D), k (B, S, Hk, D) with unit stride along D and any other strides
(``q_proj(x).view(B, S, H, D)`` needs no copy); GQA is Hq != Hk. position_ids (B, S) or
(1, S), int32/int64. One program rotates BLOCK_S tokens of HEADS heads of q and k,
computing their cos/sin once.

Reference: RoFormer (Su et al. 2021); HF ``apply_rotary_pos_emb``; TransformerEngine issue
#1245 for why FP32 matters at rope_theta=500000.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import cdiv, interpreting, launch, next_power_of_2
from .rope_reference import _check_rope_inputs, rope_reference

__all__ = ["rope_fwd", "rope_bwd", "RopeFunction", "apply_rope", "rope_reference"]

_TWO_PI = 2 * math.pi


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    pos_ptr,
    inv_freq_ptr,
    scaling,
    n_tokens,
    S,
    Hq,
    Hk,
    stride_pb,
    stride_ps,
    sq_b,
    sq_s,
    sq_h,
    sk_b,
    sk_s,
    sk_h,
    sqo_b,
    sqo_s,
    sqo_h,
    sko_b,
    sko_s,
    sko_h,
    TWO_PI: tl.constexpr,
    INV_TWO_PI: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEADS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # program (token block, head group): heads 0..Hq-1 are q's, the rest k's. cos/sin are
    # computed once per program and reused for its HEADS heads.
    pid = tl.program_id(0).to(tl.int64)
    head0 = tl.program_id(1) * HEADS
    tok = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    tok_mask = tok < n_tokens
    b = tok // S
    s = tok % S
    pos = tl.load(pos_ptr + b * stride_pb + s * stride_ps, mask=tok_mask, other=0).to(tl.float32)
    d = tl.arange(0, BLOCK_HALF)
    inv_freq = tl.load(inv_freq_ptr + d, mask=d < HALF, other=0.0)
    angle = pos[:, None] * inv_freq[None, :]  # FP32, the model's own angle
    # Reduce to [-pi, pi] in FP64 (exact for the FP32 angle; ~1e-12 absolute at 8k radians),
    # then cos/sin in FP32 of the small argument.
    a64 = angle.to(tl.float64)
    turns = tl.floor(a64 * tl.full([], INV_TWO_PI, tl.float64) + 0.5)
    r = (a64 - turns * tl.full([], TWO_PI, tl.float64)).to(tl.float32)
    c = tl.cos(r) * scaling
    sn = tl.sin(r) * scaling
    if BACKWARD:
        sn = -sn
    mask = tok_mask[:, None] & (d < HALF)[None, :]
    for i in range(HEADS):
        head = head0 + i
        if head < Hq:
            offs = (b * sq_b + s * sq_s + head * sq_h)[:, None] + d[None, :]
            yoffs = (b * sqo_b + s * sqo_s + head * sqo_h)[:, None] + d[None, :]
            _rotate_tile(q_ptr, qo_ptr, offs, yoffs, mask, c, sn, HALF)
        elif head < Hq + Hk:
            h = head - Hq
            offs = (b * sk_b + s * sk_s + h * sk_h)[:, None] + d[None, :]
            yoffs = (b * sko_b + s * sko_s + h * sko_h)[:, None] + d[None, :]
            _rotate_tile(k_ptr, ko_ptr, offs, yoffs, mask, c, sn, HALF)


@triton.jit
def _rotate_tile(x_ptr, y_ptr, offs, yoffs, mask, c, sn, HALF: tl.constexpr):
    x1 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + yoffs, (x1 * c - x2 * sn).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + yoffs + HALF, (x2 * c + x1 * sn).to(y_ptr.dtype.element_ty), mask=mask)


# (BLOCK_S tokens, HEADS per program, num_warps); benchmarks may override, the library never does.
TUNING: dict[str, tuple[int, int, int]] = {"gpu": (32, 8, 4)}


def _launch(q, k, position_ids, inv_freq, scaling, backward):
    B, S, Hq, D = q.shape
    Hk = k.shape[2]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    qo = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device)
    ko = torch.empty((B, S, Hk, D), dtype=k.dtype, device=k.device)
    pos = position_ids if position_ids.dim() == 2 else position_ids.view(1, -1)
    stride_pb = pos.stride(0) if pos.shape[0] > 1 else 0
    n_tokens = B * S
    if interpreting():
        BLOCK_S, HEADS, num_warps = 64, Hq + Hk, 1  # few, large programs: the interpreter pays per program
    else:
        BLOCK_S, HEADS, num_warps = TUNING["gpu"]
    grid = (cdiv(n_tokens, BLOCK_S), cdiv(Hq + Hk, HEADS))
    launch(
        _rope_kernel,
        grid,
        (
            q,
            k,
            qo,
            ko,
            pos,
            inv_freq,
            float(scaling),
            n_tokens,
            S,
            Hq,
            Hk,
            stride_pb,
            pos.stride(1),
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            qo.stride(0),
            qo.stride(1),
            qo.stride(2),
            ko.stride(0),
            ko.stride(1),
            ko.stride(2),
        ),
        dict(
            TWO_PI=_TWO_PI,
            INV_TWO_PI=1.0 / _TWO_PI,
            HALF=D // 2,
            BLOCK_HALF=next_power_of_2(D // 2),
            BLOCK_S=BLOCK_S,
            HEADS=HEADS,
            BACKWARD=backward,
        ),
        num_warps,
    )
    return qo, ko


def rope_fwd(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, S, Hq, D) and k (B, S, Hk, D); returns new contiguous tensors in the input dtypes."""
    _check_rope_inputs(q, k, position_ids, inv_freq)
    return _launch(q, k, position_ids, inv_freq, scaling, backward=False)


def rope_bwd(
    dq: torch.Tensor, dk: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients through the rotation: the inverse rotation (scaled) of the output gradients."""
    _check_rope_inputs(dq, dk, position_ids, inv_freq)
    return _launch(dq, dk, position_ids, inv_freq, scaling, backward=True)


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, position_ids, inv_freq, scaling):
        ctx.save_for_backward(position_ids, inv_freq)
        ctx.scaling = scaling
        return rope_fwd(q, k, position_ids, inv_freq, scaling)

    @staticmethod
    def backward(ctx, dq, dk):
        position_ids, inv_freq = ctx.saved_tensors
        dq, dk = rope_bwd(dq, dk, position_ids, inv_freq, ctx.scaling)
        return dq, dk, None, None, None


# torch.compile: dynamo cannot trace the Triton launch, so the compiled path calls one custom op
# (both directions, ``backward`` says which); eager keeps RopeFunction, without op dispatch.
@torch.library.custom_op("hf_fp8::rope", mutates_args=())
def _rope_op(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return (rope_bwd if backward else rope_fwd)(q, k, position_ids, inv_freq, scaling)


@_rope_op.register_fake
def _(q, k, position_ids, inv_freq, scaling, backward):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], inputs[3])
    ctx.scaling = inputs[4]


def _rope_op_backward(ctx, dq, dk):
    position_ids, inv_freq = ctx.saved_tensors
    gq, gk = _rope_op(dq, dk, position_ids, inv_freq, ctx.scaling, True)
    return gq, gk, None, None, None, None


_rope_op.register_autograd(_rope_op_backward, setup_context=_rope_setup)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Autograd-aware FP32 RoPE on (B, S, H, D) q and k (Triton kernel; a custom op under torch.compile)."""
    if torch.compiler.is_compiling():
        return _rope_op(q, k, position_ids, inv_freq, float(scaling), False)
    return RopeFunction.apply(q, k, position_ids, inv_freq, scaling)
