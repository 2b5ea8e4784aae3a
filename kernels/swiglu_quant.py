"""SwiGLU's backward fused with the FP8 casts of both gradients it produces.

In a Llama MLP of FP8 layers, SwiGLU's backward turns the gradient of its output into the
gradients of the gate and up projections' outputs, and each of those is then quantized
(E5M2 by default) in both layouts for that layer's two backward GEMMs. Unfused: the SwiGLU
backward reads three BF16 tensors and writes two, then each cast reads its BF16 gradient
(twice with tensorwise scaling: amax, then cast) and writes two FP8 copies. Fused, one pass
reads the three inputs and writes the four FP8 copies (delayed scaling: the scales come from
the amax histories and this pass records the new amaxes), or two passes (tensorwise: an amax
pass over the recomputed gradients, then the cast). The gradients are computed with the very
expression of :mod:`hf_fp8.kernels.norm_swiglu`'s backward and rounded to the inputs' dtype
before scaling, so the codes equal the unfused path's bit for bit.

Rowwise scaling is not handled here (each copy has its own per-row scales; the caller keeps
the unfused path). Reference: :mod:`hf_fp8.kernels.swiglu_quant_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, launch, next_power_of_2
from .quant import (
    _abs_bits,
    _given_scale,
    _interpreting,
    _max_programs,
    _saturate_and_store,
    _settings,
    _tensor_scale_from_partials,
    _trans_mode,
)
from .quant_reference import MIN_AMAX, Fp8Quantized, _check_f32_scalar, _check_fp8, pad_to
from .swiglu_quant_reference import _check_triple, swiglu_backward_quantize_reference

__all__ = ["swiglu_backward_quantize", "swiglu_backward_quantize_reference"]


@triton.jit
def _swiglu_grads(dy_ptr, g_ptr, u_ptr, offs, mask):
    """(d gate, d up) in FP32, each rounded to the gate's dtype first, as the unfused kernel stores them."""
    d = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    dg = (d * b * s * (1.0 + a * (1.0 - s))).to(g_ptr.dtype.element_ty).to(tl.float32)
    du = (d * a * s).to(g_ptr.dtype.element_ty).to(tl.float32)
    return dg, du


@triton.jit
def _amax_kernel(dy_ptr, g_ptr, u_ptr, out_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Persistent pass: per program, max|d gate| bits at out[pid] and max|d up| at out[nprog + pid]."""
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    tiles_c = tl.cdiv(C, BLOCK_C)
    n_tiles = tl.cdiv(R, BLOCK_R) * tiles_c
    acc_g = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
    acc_u = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
    for tile in range(pid, n_tiles, num_progs):
        rows = (tile // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (tile % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows < R)[:, None] & (cols < C)[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        dg, du = _swiglu_grads(dy_ptr, g_ptr, u_ptr, offs, mask)
        acc_g = tl.maximum(acc_g, _abs_bits(dg))
        acc_u = tl.maximum(acc_u, _abs_bits(du))
    tl.store(out_ptr + pid, tl.max(tl.max(acc_g, axis=1), axis=0))
    tl.store(out_ptr + num_progs + pid, tl.max(tl.max(acc_u, axis=1), axis=0))


@triton.jit
def _scale_cast_store(
    v, which, pid, rows, cols, mask, R, C, R_pad, src_ptr, y_ptr, yt_ptr, partials_ptr, n_partials, scale_ptr,
    record_ptr, scale_inv_ptr, amax_ptr, scale_out_ptr, flag_ptr,
    FP8_MAX: tl.constexpr, MIN_AMAX_C: tl.constexpr, FROM_TENSOR: tl.constexpr, HAS_FLAG: tl.constexpr,
    WRITE_Y: tl.constexpr, WRITE_T: tl.constexpr, TRANS_MODE: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Scale, saturate and store one gradient tile (``which``: 0 gate, 1 up), as quant._cast_kernel does."""
    if FROM_TENSOR:
        scale = _given_scale(
            v, scale_ptr, record_ptr, pid, scale_inv_ptr, scale_out_ptr, flag_ptr, True, HAS_FLAG, False
        )
    else:
        scale = _tensor_scale_from_partials(
            partials_ptr + which * n_partials, n_partials, pid, scale_inv_ptr, amax_ptr, scale_out_ptr, flag_ptr,
            FP8_MAX, MIN_AMAX_C, HAS_FLAG, BLOCK_P,
        )  # fmt: skip
    _saturate_and_store(
        v * scale, v, scale, src_ptr, y_ptr, yt_ptr, rows, cols, mask, C, R_pad, C, R_pad,
        FP8_MAX, WRITE_Y, WRITE_T, TRANS_MODE,
    )  # fmt: skip


@triton.jit
def _cast_kernel(
    dy_ptr, g_ptr, u_ptr,
    yg_ptr, ytg_ptr, yu_ptr, ytu_ptr,
    partials_ptr, n_partials,
    scale_g_ptr, scale_u_ptr, record_g_ptr, record_u_ptr,
    scale_inv_g_ptr, amax_g_ptr, scale_out_g_ptr, flag_g_ptr,  # 0-d outputs each (16-byte aligned for cuBLASLt)
    scale_inv_u_ptr, amax_u_ptr, scale_out_u_ptr, flag_u_ptr,
    R, C, R_pad,
    FP8_MAX: tl.constexpr, MIN_AMAX_C: tl.constexpr, FROM_TENSOR: tl.constexpr, HAS_FLAG: tl.constexpr,
    WRITE_Y: tl.constexpr, WRITE_T: tl.constexpr, TRANS_MODE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(C, BLOCK_C)
    rows = (pid // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    dg, du = _swiglu_grads(dy_ptr, g_ptr, u_ptr, rows.to(tl.int64)[:, None] * C + cols[None, :], mask)
    _scale_cast_store(
        dg, 0, pid, rows, cols, mask, R, C, R_pad, g_ptr, yg_ptr, ytg_ptr, partials_ptr, n_partials, scale_g_ptr,
        record_g_ptr, scale_inv_g_ptr, amax_g_ptr, scale_out_g_ptr, flag_g_ptr,
        FP8_MAX, MIN_AMAX_C, FROM_TENSOR, HAS_FLAG, WRITE_Y, WRITE_T, TRANS_MODE, BLOCK_P,
    )  # fmt: skip
    _scale_cast_store(
        du, 1, pid, rows, cols, mask, R, C, R_pad, g_ptr, yu_ptr, ytu_ptr, partials_ptr, n_partials, scale_u_ptr,
        record_u_ptr, scale_inv_u_ptr, amax_u_ptr, scale_out_u_ptr, flag_u_ptr,
        FP8_MAX, MIN_AMAX_C, FROM_TENSOR, HAS_FLAG, WRITE_Y, WRITE_T, TRANS_MODE, BLOCK_P,
    )  # fmt: skip


def swiglu_backward_quantize(
    grad: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    fp8_dtype: torch.dtype,
    *,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    amax_slots: tuple[torch.Tensor, torch.Tensor] | None = None,
    write_y: bool = True,
    write_t: bool = False,
    nonfinite_flags: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    block: tuple[int, int, int] | None = None,
) -> tuple[Fp8Quantized, Fp8Quantized]:
    """FP8 copies of SwiGLU's two input gradients, ``(d gate, d up)``, without writing them in BF16.

    Args:
        grad, gate, up (`torch.Tensor`): (R, C), the gradient of ``silu(gate) * up`` and the
            forward's inputs; gate and up share a dtype (BF16 when both copies are written).
        scales, amax_slots (`tuple`, *optional*): delayed scaling: each gradient's FP32 0-d scale
            and the amax-history slot its amax is max-reduced into. Without them, tensorwise.
        write_y, write_t (`bool`): the row-major and the (C, pad_to(R)) transposed copies.
        nonfinite_flags (`tuple`): int32 (1,) flags set to 1 if that gradient has inf/NaN.

    Returns:
        One :class:`Fp8Quantized` per gradient, as ``quantize_tensorwise`` / ``quantize_delayed``
        of the unfused gradients would return (bit for bit).
    """
    _check_triple(grad, gate, up)
    fmax = _check_fp8(fp8_dtype)
    if write_y and write_t and gate.dtype != torch.bfloat16:
        # quant._launch_cast's rule: both copies from one FP32 tile miscompiled on triton 3.6 / H100
        raise ValueError("swiglu_backward_quantize: both copies at once need BF16 inputs (use the unfused path)")
    if (scales is None) != (amax_slots is None):
        raise ValueError("swiglu_backward_quantize: scales and amax_slots go together (delayed scaling)")
    grad, gate, up = grad.contiguous(), gate.contiguous(), up.contiguous()
    R, C = gate.shape
    R_pad = pad_to(R) if write_t else R
    dev = gate.device
    f32 = dict(dtype=torch.float32, device=dev)
    outs = [
        (
            torch.empty((R, C), dtype=fp8_dtype, device=dev) if write_y else None,
            torch.empty((C, R_pad), dtype=fp8_dtype, device=dev) if write_t else None,
        )
        for _ in range(2)
    ]
    # per gradient: scale_inv, amax, scale (separate 0-d tensors: cuBLASLt wants aligned scale pointers)
    meta = [[torch.empty((), **f32) for _ in range(3)] for _ in range(2)]
    if scales is None:
        BLOCK_R, BLOCK_C, num_warps = (64, 128, 4) if _interpreting() else (16, 512, 8)
        n_progs = min(cdiv(R, BLOCK_R) * cdiv(C, BLOCK_C), _max_programs(gate))
        partials = torch.empty(2 * n_progs, dtype=torch.int32, device=dev)
        launch(
            _amax_kernel,
            (n_progs,),
            (
                grad,
                gate,
                up,
                partials,
                R,
                C,
            ),
            dict(BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C),
            num_warps,
        )
    else:
        n_progs, partials = 0, meta[0][0]
        for name, t in zip(("scales[0]", "scales[1]", "amax_slots[0]", "amax_slots[1]"), (*scales, *amax_slots)):
            _check_f32_scalar(name, t)
    BLOCK_R, BLOCK_C, num_warps = block or _settings(gate, write_t)
    grid = (cdiv(R_pad, BLOCK_R) * cdiv(C, BLOCK_C),)
    dummy = meta[0][0]
    (yg, ytg), (yu, ytu) = outs
    flag_g, flag_u = nonfinite_flags
    launch(_cast_kernel, grid, (grad, gate, up, yg if yg is not None else ytg, ytg if ytg is not None else yg, yu if yu is not None else ytu, ytu if ytu is not None else yu, partials, n_progs, scales[0] if scales else dummy, scales[1] if scales else dummy, amax_slots[0].view(torch.int32) if amax_slots else dummy, amax_slots[1].view(torch.int32) if amax_slots else dummy, *meta[0], flag_g if flag_g is not None else dummy, *meta[1], flag_u if flag_u is not None else dummy, R, C, R_pad,), dict(FP8_MAX=fmax, MIN_AMAX_C=MIN_AMAX, FROM_TENSOR=scales is not None, HAS_FLAG=flag_g is not None and flag_u is not None, WRITE_Y=write_y, WRITE_T=write_t, TRANS_MODE=_trans_mode(gate, True), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, BLOCK_P=max(next_power_of_2(max(n_progs, 1)), 16)), num_warps)  # fmt: skip
    result = []
    for i, ((y, yt), (scale_inv, amax, scale)) in enumerate(zip(outs, meta)):
        if scales is None:
            result.append(Fp8Quantized(y, yt, scale_inv, amax, scale))
        else:
            result.append(Fp8Quantized(y, yt, scale_inv, amax_slots[i]))
    return result[0], result[1]
