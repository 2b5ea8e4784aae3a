"""Quantization entry points that pick the Triton kernel or its torch reference.

Both compute the same bits (tests prove it), so this choice changes speed, never numerics.
"""

from __future__ import annotations

from typing import Any

import torch

from hf_fp8._backend import use_triton_kernels
from hf_fp8.kernels import quant_reference as _ref
from hf_fp8.kernels.quant_reference import Fp8Quantized

__all__ = [
    "Fp8Quantized",
    "quantize_tensorwise",
    "quantize_delayed",
    "quantize_with_scale",
    "quantize_rowwise",
    "quantize_colwise_transposed",
    "delayed_scale_update",
    "swiglu_backward_quantize",
    "delayed_scale_update_many",
    "amax_to_scale",
    "quantize_tiles",
    "quantize_tiles_transposed",
    "quantize_blocks",
]


_KERNELS: list = []  # hf_fp8.kernels.quant, imported on first use (it needs triton)


def _impl(name: str, x: torch.Tensor) -> Any:
    if use_triton_kernels(x):
        if not _KERNELS:
            from hf_fp8.kernels import quant

            _KERNELS.append(quant)
        return getattr(_KERNELS[0], name)
    return getattr(_ref, name + "_reference")


def quantize_tensorwise(x: torch.Tensor, fp8_dtype: torch.dtype, **kwargs: Any) -> Fp8Quantized:
    return _impl("quantize_tensorwise", x)(x, fp8_dtype, **kwargs)


def quantize_delayed(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    scale: torch.Tensor,
    amax_slot: torch.Tensor,
    **kwargs: Any,
) -> Fp8Quantized:
    return _impl("quantize_delayed", x)(x, fp8_dtype, scale, amax_slot, **kwargs)


def quantize_with_scale(x: torch.Tensor, fp8_dtype: torch.dtype, scale: torch.Tensor, **kwargs: Any) -> Fp8Quantized:
    return _impl("quantize_with_scale", x)(x, fp8_dtype, scale, **kwargs)


def quantize_rowwise(x: torch.Tensor, fp8_dtype: torch.dtype, **kwargs: Any) -> Fp8Quantized:
    return _impl("quantize_rowwise", x)(x, fp8_dtype, **kwargs)


def quantize_colwise_transposed(x: torch.Tensor, fp8_dtype: torch.dtype, **kwargs: Any) -> Fp8Quantized:
    return _impl("quantize_colwise_transposed", x)(x, fp8_dtype, **kwargs)


def delayed_scale_update(
    history: torch.Tensor,
    scale: torch.Tensor,
    slot: int,
    fp8_dtype: torch.dtype,
    **kwargs: Any,
) -> None:
    _impl("delayed_scale_update", history)(history, scale, slot, fp8_dtype, **kwargs)


def delayed_scale_update_many(
    histories: list[torch.Tensor], scales: list[torch.Tensor], slots: list[int], fp8_dtype: torch.dtype, **kwargs: Any
) -> None:
    _impl("delayed_scale_update_many", histories[0])(histories, scales, slots, fp8_dtype, **kwargs)


def swiglu_backward_quantize(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, fp8_dtype: torch.dtype, **kwargs: Any
) -> tuple[Fp8Quantized, Fp8Quantized]:
    if use_triton_kernels(gate):
        from hf_fp8.kernels.swiglu_quant import swiglu_backward_quantize as fn
    else:
        from hf_fp8.kernels.swiglu_quant_reference import swiglu_backward_quantize_reference as fn
    return fn(grad, gate, up, fp8_dtype, **kwargs)


amax_to_scale = _ref.amax_to_scale_reference


# ---- the blockwise recipe: 1x128 tiles and 128x128 weight blocks ----------------------------
def quantize_tiles(x: torch.Tensor, fp8_dtype: torch.dtype, **kwargs: Any) -> Fp8Quantized:
    if use_triton_kernels(x):
        from hf_fp8.kernels.blockwise import quantize_tiles as fn
    else:
        from hf_fp8.kernels.blockwise_reference import quantize_tiles as fn
    return fn(x, fp8_dtype, **kwargs)


def quantize_tiles_transposed(x: torch.Tensor, fp8_dtype: torch.dtype, **kwargs: Any) -> Fp8Quantized:
    if use_triton_kernels(x):
        from hf_fp8.kernels.blockwise import quantize_tiles_transposed as fn
    else:
        from hf_fp8.kernels.blockwise_reference import quantize_tiles_transposed as fn
    return fn(x, fp8_dtype, **kwargs)


def quantize_blocks(w: torch.Tensor, fp8_dtype: torch.dtype, **kwargs: Any) -> Fp8Quantized:
    if use_triton_kernels(w) and w.stride(1) == 1:
        from hf_fp8.kernels.blockwise import quantize_blocks as fn
    else:
        from hf_fp8.kernels.blockwise_reference import quantize_blocks as fn
    return fn(w, fp8_dtype, **kwargs)
