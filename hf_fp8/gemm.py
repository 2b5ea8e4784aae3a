"""The FP8 GEMM: ``torch._scaled_mm`` on FP8-capable GPUs, an exact emulation elsewhere.

Emulation: dequantize is exact (every FP8 value is an FP32 value), the product of the FP8
values is accumulated in FP32, and the scales are applied after accumulation, as the GPU
epilogue does. The result differs from ``_scaled_mm`` only by FP32 summation order
(about 1e-7 relative per GEMM), so CPU tests check the numerics the GPU runs.
"""

from __future__ import annotations

import torch

__all__ = ["scaled_mm"]

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _check_operands(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor) -> bool:
    """Enforce the GPU's rules everywhere, so a CPU run fails where the GPU would. Returns rowwise."""
    if a.dtype not in _FP8_DTYPES or b.dtype not in _FP8_DTYPES:
        raise TypeError(f"scaled_mm: operands must be FP8, got {a.dtype} and {b.dtype}")
    if a.dtype == torch.float8_e5m2 and b.dtype == torch.float8_e5m2:
        raise TypeError("scaled_mm: at most one operand may be float8_e5m2")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"scaled_mm: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not chain")
    if a.shape[1] % 16 or b.shape[1] % 16:
        raise ValueError(f"scaled_mm: K={a.shape[1]} and N={b.shape[1]} must be multiples of 16")
    if a.stride(1) != 1 or b.stride(0) != 1:
        raise ValueError("scaled_mm: a must be row-major and b column-major")
    rowwise = scale_a.numel() > 1 or scale_b.numel() > 1
    if rowwise and (scale_a.shape != (a.shape[0], 1) or scale_b.shape != (1, b.shape[1])):
        raise ValueError(
            f"scaled_mm: rowwise scales must be ({a.shape[0]}, 1) and (1, {b.shape[1]}), "
            f"got {tuple(scale_a.shape)} and {tuple(scale_b.shape)}"
        )
    return rowwise


def scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    use_fast_accum: bool = False,
    emulate: bool,
) -> torch.Tensor:
    """``(a * scale_a) @ (b * scale_b)`` with FP32 accumulation, returned in ``out_dtype``.

    Args:
        a (`torch.Tensor`): (M, K) FP8, row-major.
        b (`torch.Tensor`): (K, N) FP8, column-major (the ``.t()`` of a contiguous (N, K)).
        scale_a, scale_b (`torch.Tensor`): FP32 dequantization factors (``scale_inv``): one
            element each (tensorwise) or (M, 1) and (1, N) (rowwise).
        out_dtype (`torch.dtype`): result dtype. Rowwise GEMMs produce BF16 on the GPU and are
            cast afterwards; the emulation rounds through BF16 the same way.
        emulate (`bool`): use the FP32 emulation instead of ``torch._scaled_mm``.
    """
    rowwise = _check_operands(a, b, scale_a, scale_b)
    gemm_dtype = torch.bfloat16 if rowwise else out_dtype
    if emulate:
        acc = a.float() @ b.float()
        out = acc * scale_a * scale_b if rowwise else acc * (scale_a * scale_b)
        out = out.to(gemm_dtype)
    else:
        out = torch._scaled_mm(
            a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=gemm_dtype, use_fast_accum=use_fast_accum
        )
    return out if out.dtype == out_dtype else out.to(out_dtype)
