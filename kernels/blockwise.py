"""Triton kernels of the blockwise recipe's casts, one pass each: activations and gradients in
1x128 tiles, weights in 128x128 blocks (:func:`quantize_blocks`, one program per block).

Each program loads a (BLOCK_R, 128) tile of the operand, takes each row's amax (the tile's),
scales, saturates and writes the E4M3 codes, the tile's ``scale_inv`` and amax: the same bits as
:func:`hf_fp8.kernels.blockwise_reference.quantize_tiles` (``tests/test_blockwise.py`` runs both
under the interpreter; the scale is the guarded ``448 / amax`` of :mod:`hf_fp8.kernels.quant`,
correctly rounded). The pure-torch reference takes about eight passes over FP32 copies of the
operand; on the H100 that made LoRA on a block-FP8 checkpoint 1.45x slower than BF16 LoRA
(``benchmarks/results/lora_published_h100.json``), the casts costing more than the FP8 GEMMs saved.

The transposed copy (128x1 tiles of ``x``, written as 1x128 tiles of ``xᵀ`` zero-padded to
whole tiles) runs the same kernel on ``x.t()``, a strided view: no copy of ``x`` is made.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .blockwise_reference import TILE
from .quant import _abs_bits, _reciprocal, _saturate, _scale_from_amax
from .quant_reference import MIN_AMAX, Fp8Quantized, _check_fp8, _operand, pad_to

__all__ = ["quantize_blocks", "quantize_tiles", "quantize_tiles_transposed"]


@triton.jit
def _tile_cast_kernel(
    x_ptr, y_ptr, s_ptr, amax_ptr, flag_ptr, R, C_in, C_out, stride_xr, stride_xc, stride_yr, G,
    FP8_MAX: tl.constexpr, MIN_AMAX_C: tl.constexpr, HAS_FLAG: tl.constexpr, BLOCK_R: tl.constexpr,
    TILE_C: tl.constexpr,
):  # fmt: skip
    """Rows [pid_r * BLOCK_R, ...) x tile ``g`` of columns: ``x`` read up to ``C_in`` (zeros
    beyond), codes written up to ``C_out`` (the zero padding included)."""
    pid_r, g = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = g * TILE_C + tl.arange(0, TILE_C)
    rows64 = rows.to(tl.int64)
    in_mask = (rows < R)[:, None] & (cols < C_in)[None, :]
    x = tl.load(x_ptr + rows64[:, None] * stride_xr + cols.to(tl.int64)[None, :] * stride_xc, mask=in_mask, other=0.0)
    x = x.to(tl.float32)
    amax = tl.max(_abs_bits(x), axis=1).to(tl.float32, bitcast=True)  # NaN above inf: NaN wins
    scale = _scale_from_amax(amax, FP8_MAX, MIN_AMAX_C)
    y = _saturate(x * scale[:, None], x, FP8_MAX)
    out_mask = (rows < R)[:, None] & (cols < C_out)[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_yr + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=out_mask)
    row_mask = rows < R
    tl.store(s_ptr + rows64 * G + g, _reciprocal(scale), mask=row_mask)
    tl.store(amax_ptr + rows64 * G + g, amax, mask=row_mask)
    if HAS_FLAG:  # the int32 sticky non-finite flag
        bad = tl.max(tl.where(row_mask & ~(amax < float("inf")), 1, 0), axis=0)
        tl.store(flag_ptr, 1, mask=bad > 0)


@triton.jit
def _block_cast_kernel(
    w_ptr, y_ptr, s_ptr, amax_ptr, flag_ptr, R, C, stride_wr, stride_yr, GC,
    FP8_MAX: tl.constexpr, MIN_AMAX_C: tl.constexpr, HAS_FLAG: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One 128x128 block of the weight: its amax, scale, codes and ``scale_inv``."""
    br, bc = tl.program_id(0), tl.program_id(1)
    rows = br * BLOCK + tl.arange(0, BLOCK)
    cols = bc * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_wr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(_abs_bits(w), axis=1), axis=0).to(tl.float32, bitcast=True)
    scale = _scale_from_amax(amax, FP8_MAX, MIN_AMAX_C)
    y = _saturate(w * scale, w, FP8_MAX)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_yr + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + br * GC + bc, _reciprocal(scale))
    tl.store(amax_ptr + br * GC + bc, amax)
    if HAS_FLAG:
        tl.store(flag_ptr, 1, mask=~(amax < float("inf")))


def quantize_blocks(w: torch.Tensor, fp8_dtype: torch.dtype, *, nonfinite_flag: torch.Tensor | None = None):
    """:func:`~hf_fp8.kernels.blockwise_reference.quantize_blocks`, in one pass."""
    R, C = w.shape
    GR, GC = -(-R // TILE), -(-C // TILE)
    y = torch.empty((R, C), dtype=fp8_dtype, device=w.device)
    s = torch.empty((GR, GC), dtype=torch.float32, device=w.device)
    amax = torch.empty((GR, GC), dtype=torch.float32, device=w.device)
    _block_cast_kernel[(GR, GC)](
        w, y, s, amax, nonfinite_flag if nonfinite_flag is not None else s, R, C, w.stride(0), y.stride(0), GC,
        FP8_MAX=_check_fp8(fp8_dtype), MIN_AMAX_C=MIN_AMAX, HAS_FLAG=nonfinite_flag is not None, BLOCK=TILE,
    )  # fmt: skip
    return Fp8Quantized(y, None, s, amax)


def _launch(x: torch.Tensor, fp8_dtype: torch.dtype, c_out: int, nonfinite_flag) -> Fp8Quantized:
    R, C_in = x.shape
    G = -(-c_out // TILE)
    y = torch.empty((R, c_out), dtype=fp8_dtype, device=x.device)
    s = torch.empty((R, G), dtype=torch.float32, device=x.device)
    amax = torch.empty((R, G), dtype=torch.float32, device=x.device)
    block_r = 32
    _tile_cast_kernel[(triton.cdiv(R, block_r), G)](
        x, y, s, amax, nonfinite_flag if nonfinite_flag is not None else s, R, C_in, c_out, x.stride(0), x.stride(1),
        y.stride(0), G, FP8_MAX=_check_fp8(fp8_dtype), MIN_AMAX_C=MIN_AMAX, HAS_FLAG=nonfinite_flag is not None,
        BLOCK_R=block_r, TILE_C=TILE,
    )  # fmt: skip
    return Fp8Quantized(y, None, s, amax)


def quantize_tiles(
    x: torch.Tensor, fp8_dtype: torch.dtype, *, nonfinite_flag: torch.Tensor | None = None, swiglu_up=None
) -> Fp8Quantized:
    """:func:`~hf_fp8.kernels.blockwise_reference.quantize_tiles`, in one pass."""
    x = _operand(x, swiglu_up)
    return _launch(x, fp8_dtype, x.shape[1], nonfinite_flag)


def quantize_tiles_transposed(
    x: torch.Tensor, fp8_dtype: torch.dtype, *, nonfinite_flag: torch.Tensor | None = None, swiglu_up=None
) -> Fp8Quantized:
    """:func:`~hf_fp8.kernels.blockwise_reference.quantize_tiles_transposed`, in one pass over ``x.t()``."""
    x = _operand(x, swiglu_up)
    q = _launch(x.t(), fp8_dtype, pad_to(x.shape[0], TILE), nonfinite_flag)
    return Fp8Quantized(None, q.data, q.scale_inv, q.amax)
