"""Blockwise FP8 quantization (DeepSeek-V3's scheme, transformers' fine-grained FP8 format):
activations and gradients in 1x128 tiles, weights in 128x128 blocks, one FP32 scale each.

Pure torch on every device: the casts are a few reductions and one elementwise pass that the
GPU runs as ordinary torch kernels, and the GEMM that consumes them (``torch._scaled_mm`` with
blockwise scales on Hopper, :func:`hf_fp8.gemm.scaled_mm`) is where the time goes. The scale of
each tile is :func:`amax_to_scale_reference` of its amax, the codes are the tile times that scale,
saturated, as every other recipe casts (:mod:`hf_fp8.kernels.quant_reference`).

Layouts (scales always follow the row-major copy they dequantize):

==================  ===========================  ============================================
function            codes                        ``scale_inv``
==================  ===========================  ============================================
``quantize_tiles``  (R, C)                       (R, ceil(C/128)): 1x128 tiles along rows
``..._transposed``  (C, pad128(R)), zero-padded  (C, pad128(R)/128): 128x1 tiles of x
``quantize_blocks`` (R, C)                       (ceil(R/128), ceil(C/128)): 128x128 blocks
==================  ===========================  ============================================

A 128x128 block's codes serve both GEMMs that read the weight (forward and input gradient):
the transposed weight is the same codes transposed with the transposed scales, with no second
rounding (why DeepSeek-V3 scales weights in square blocks).
"""

from __future__ import annotations

import torch

from .quant_reference import (
    Fp8Quantized,
    _amax_reference,
    _cast_reference,
    _check_fp8,
    _operand,
    _set_flag,
    amax_to_scale_reference,
    pad_to,
)

TILE = 128

__all__ = [
    "TILE",
    "dequantize_blocks",
    "dequantize_tiles",
    "quantize_blocks",
    "quantize_tiles",
    "quantize_tiles_transposed",
]


def _tiles(x: torch.Tensor) -> torch.Tensor:
    """(R, C) -> (R, G, 128) FP32, zero-padded along C (zeros change no tile's amax)."""
    R, C = x.shape
    G = -(-C // TILE)
    x = x.float()
    if G * TILE != C:
        x = torch.nn.functional.pad(x, (0, G * TILE - C))
    return x.view(R, G, TILE)


def quantize_tiles(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    *,
    nonfinite_flag: torch.Tensor | None = None,
    swiglu_up: torch.Tensor | None = None,
) -> Fp8Quantized:
    """``x`` (R, C) in 1x128 tiles: codes (R, C), ``scale_inv`` and ``amax`` (R, ceil(C/128))."""
    x = _operand(x, swiglu_up)
    R, C = x.shape
    tiles = _tiles(x)
    amax = _amax_reference(tiles, 2)
    scale = amax_to_scale_reference(amax, _check_fp8(fp8_dtype))
    _set_flag(nonfinite_flag, amax)
    q = _cast_reference(tiles, scale[:, :, None], fp8_dtype).view(R, -1)[:, :C]
    return Fp8Quantized(q.contiguous(), None, 1.0 / scale, amax)


def quantize_tiles_transposed(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    *,
    nonfinite_flag: torch.Tensor | None = None,
    swiglu_up: torch.Tensor | None = None,
) -> Fp8Quantized:
    """``x`` (R, C) in 128x1 tiles, written transposed: codes (C, pad128(R)) zero-padded (the
    contraction dimension of the weight-gradient GEMM, whole tiles: the H100 run of git 3cb067c
    failed the blockwise layer's GPU test where it was padded to 16 only, while whole-tile GEMMs
    matched the emulation), ``scale_inv`` (C, pad128(R)/128)."""
    x = _operand(x, swiglu_up)
    R, C = x.shape
    xt = torch.zeros((C, pad_to(R, TILE)), dtype=torch.float32, device=x.device)
    xt[:, :R] = x.t().float()
    q = quantize_tiles(xt, fp8_dtype, nonfinite_flag=nonfinite_flag)
    return Fp8Quantized(None, q.data, q.scale_inv, q.amax)


def quantize_blocks(
    w: torch.Tensor, fp8_dtype: torch.dtype, *, nonfinite_flag: torch.Tensor | None = None
) -> Fp8Quantized:
    """``w`` (R, C) in 128x128 blocks: codes (R, C), ``scale_inv`` and ``amax`` (ceil(R/128), ceil(C/128))."""
    R, C = w.shape
    GR, GC = -(-R // TILE), -(-C // TILE)
    x = torch.nn.functional.pad(w.float(), (0, GC * TILE - C, 0, GR * TILE - R)).view(GR, TILE, GC, TILE)
    amax = _amax_reference(x, (1, 3))
    scale = amax_to_scale_reference(amax, _check_fp8(fp8_dtype))
    _set_flag(nonfinite_flag, amax)
    q = _cast_reference(x, scale[:, None, :, None], fp8_dtype).view(GR * TILE, GC * TILE)[:R, :C]
    return Fp8Quantized(q.contiguous(), None, 1.0 / scale, amax)


def dequantize_tiles(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """FP32 values of :func:`quantize_tiles`' codes (each code times its tile's ``scale_inv``, one FP32 rounding)."""
    R, C = q.shape
    return (q.float() * scale_inv.repeat_interleave(TILE, dim=1)[:, :C]).view(R, C)


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """FP32 values of :func:`quantize_blocks`' codes."""
    R, C = q.shape
    full = scale_inv.repeat_interleave(TILE, dim=0).repeat_interleave(TILE, dim=1)[:R, :C]
    return q.float() * full
