"""The FP8 GEMM: ``torch._scaled_mm`` on FP8-capable GPUs, an exact emulation elsewhere.

Emulation: dequantize is exact (every FP8 value is an FP32 value), the product of the FP8
values is accumulated in FP32, and the scales are applied after accumulation, as the GPU
epilogue does. The result differs from ``_scaled_mm`` only by FP32 summation order
(about 1e-7 relative per GEMM), so CPU tests check the numerics the GPU runs.
"""

from __future__ import annotations

import torch

__all__ = ["BLOCKWISE_GEMMS", "blockwise_gemm_supported", "scaled_mm", "scaled_mm_blockwise"]

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


# ---- blockwise scales (DeepSeek-V3's 1x128 tiles and 128x128 blocks) -----------------------
TILE = 128
# (a's scaling, b's scaling) pairs Hopper's cuBLAS runs (>= 12.9): tiles x blocks (forward and
# input gradient, the weight in blocks) and tiles x tiles (weight gradient)
BLOCKWISE_GEMMS = (("1x128", "128x128"), ("1x128", "1x128"))


def blockwise_gemm_supported() -> bool:
    """Whether this torch has the scaled-mm API that takes blockwise scales (torch >= 2.10)."""
    F = torch.nn.functional
    return hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")


def _check_blockwise(a, b, scale_a, scale_b, blocks) -> None:
    if blocks not in BLOCKWISE_GEMMS:
        raise ValueError(f"scaled_mm_blockwise: blocks {blocks!r} is not one of {BLOCKWISE_GEMMS}")
    _check_operands(a, b, torch.ones(()), torch.ones(()))
    (M, K), N = a.shape, b.shape[1]
    G = -(-K // TILE)
    want_b = (N, G) if blocks[1] == "1x128" else (-(-N // TILE), G)
    if tuple(scale_a.shape) != (M, G) or tuple(scale_b.shape) != want_b:
        raise ValueError(
            f"scaled_mm_blockwise: a ({M}, {K}) in 1x128 tiles needs scale_a ({M}, {G}), and b ({K}, {N}) in "
            f"{blocks[1]} {'tiles' if blocks[1] == '1x128' else 'blocks'} scale_b {want_b} (the scales of bᵀ's rows); "
            f"got {tuple(scale_a.shape)} and {tuple(scale_b.shape)}"
        )


def _outer_dim_major(scale: torch.Tensor) -> torch.Tensor:
    """The same (R, G) scales stored column by column (stride (1, R)), as cuBLAS reads 1x128 scales."""
    return scale if scale.stride(0) == 1 else scale.t().contiguous().t()


def _block_scales_for_cublas(scale: torch.Tensor) -> torch.Tensor:
    """(Nb, G) block scales as cuBLAS reads them: (G4, Nb) with stride (1, G4), G padded to a
    multiple of 4 (16-byte aligned columns)."""
    Nb, G = scale.shape
    G4 = -(-G // 4) * 4
    if G4 != G:
        scale = torch.nn.functional.pad(scale, (0, G4 - G))
    return scale.contiguous().t()


def _rows_padded_for_cublas(a: torch.Tensor, scale_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` (M, K) and its 1x128 scales (M, G) with M padded to a multiple of 16 (zero rows, unit
    scales): cuBLAS reads the scales column by column with leading dimension M, which must be
    16-byte aligned (measured on the H100: M=999 gives CUBLAS_STATUS_NOT_SUPPORTED, M=1000 runs).
    The padded rows of the product are zeros; callers slice them off."""
    M = a.shape[0]
    pad = -M % 16
    if pad == 0:
        return a, scale_a
    a = torch.cat([a, a.new_zeros((pad, a.shape[1]))])
    scale_a = torch.cat([scale_a, scale_a.new_ones((pad, scale_a.shape[1]))])
    return a, scale_a


def scaled_mm_blockwise(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    *,
    blocks: tuple[str, str],
    out_dtype: torch.dtype,
    emulate: bool,
) -> torch.Tensor:
    """``a @ b`` with blockwise dequantization factors, FP32 accumulation, in ``out_dtype``.

    Args:
        a (`torch.Tensor`): (M, K) FP8, row-major, in 1x128 tiles along K: ``scale_a`` (M, ceil(K/128)).
        b (`torch.Tensor`): (K, N) FP8, column-major (the ``.t()`` of a contiguous (N, K) ``bᵀ``);
            ``scale_b`` is the scale of ``bᵀ``'s rows: (N, ceil(K/128)) for ``"1x128"`` tiles,
            (ceil(N/128), ceil(K/128)) for ``"128x128"`` blocks.
        blocks: ``(a's scaling, b's scaling)``, one of :data:`BLOCKWISE_GEMMS`.

    The GPU accumulates each 128-wide slice of K in FP32 and adds it in with its two scales; the
    emulation does the same slice by slice, so the two differ only by summation order. The
    GEMM's result is BF16 on the GPU (cast afterwards); the emulation rounds through BF16 too.
    """
    _check_blockwise(a, b, scale_a, scale_b, blocks)
    if emulate:
        (M, K), N = a.shape, b.shape[1]
        acc = torch.zeros((M, N), dtype=torch.float32, device=a.device)
        for g in range(-(-K // TILE)):
            ks = slice(g * TILE, min(K, (g + 1) * TILE))
            sb = scale_b[:, g] if blocks[1] == "1x128" else scale_b[:, g].repeat_interleave(TILE)[:N]
            acc += (a[:, ks].float() @ b[ks, :].float()) * scale_a[:, g : g + 1] * sb[None, :]
        out = acc.to(torch.bfloat16)
    else:
        if not blockwise_gemm_supported():
            raise RuntimeError(
                "scaled_mm_blockwise: this torch has no torch.nn.functional.scaled_mm with blockwise scales "
                f"(torch {torch.__version__}); the blockwise recipe needs torch >= 2.10 built with CUDA >= 12.9"
            )
        F = torch.nn.functional
        kind = {"1x128": F.ScalingType.BlockWise1x128, "128x128": F.ScalingType.BlockWise128x128}
        sb = _outer_dim_major(scale_b) if blocks[1] == "1x128" else _block_scales_for_cublas(scale_b)
        M = a.shape[0]
        a, scale_a = _rows_padded_for_cublas(a, scale_a)
        out = F.scaled_mm(
            a, b, _outer_dim_major(scale_a), kind[blocks[0]], sb, kind[blocks[1]], output_dtype=torch.bfloat16
        )[:M]
    return out if out.dtype == out_dtype else out.to(out_dtype)
