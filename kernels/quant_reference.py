"""Pure-torch references for :mod:`hf_fp8.kernels.quant`: the same function, bit for bit.

They run on any device without triton and are what the CPU training path uses. Every
step mirrors the kernel: FP32 arithmetic, correctly rounded division, saturation of finite
values, NaN for non-finite input, and the guarded scale (see the kernel module's docstring).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Smallest amax that still gives a finite scale for E5M2 (57344 / 1e-12 < FLT_MAX).
MIN_AMAX = 1e-12
# Transposed copies are padded to this multiple: the K dimension of ``_scaled_mm``.
PAD_MULTIPLE = 16


def pad_to(n: int, multiple: int = PAD_MULTIPLE) -> int:
    return (n + multiple - 1) // multiple * multiple


class Fp8Quantized(NamedTuple):
    """Result of a quantization.

    ``data``: (R, C) FP8, row-major, or None if not requested.
    ``data_t``: (C, pad_to(R)) FP8, the transposed copy zero-padded, or None.
    ``scale_inv``: FP32, ``()`` per tensor, ``(R,)`` per row, ``(C,)`` per column.
    ``amax``: FP32 with the same shape as ``scale_inv`` (for delayed: the amax just recorded
    is in the caller's history slot, and this is that slot).
    ``scale``: tensorwise (and delayed with ``keep_scale``), the FP32 multiplier the cast used
    (``1 / scale_inv`` need not round back to it), so that a later cast can reproduce the same codes.
    """

    data: torch.Tensor | None
    data_t: torch.Tensor | None
    scale_inv: torch.Tensor
    amax: torch.Tensor
    scale: torch.Tensor | None = None


def _check_2d(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: expected float32, bfloat16 or float16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name}: cannot quantize an empty tensor of shape {tuple(x.shape)}")


def _check_swiglu_up(x: torch.Tensor, up: torch.Tensor) -> None:
    """``up`` must pair elementwise with the gate ``x`` (the SwiGLU inputs)."""
    if not isinstance(up, torch.Tensor):
        raise TypeError(f"swiglu_up: expected a torch.Tensor, got {type(up).__name__}")
    if up.shape != x.shape or up.dtype != x.dtype or up.device != x.device:
        raise ValueError(
            f"swiglu_up: expected the gate's shape, dtype and device {tuple(x.shape)} {x.dtype} {x.device}, "
            f"got {tuple(up.shape)} {up.dtype} {up.device}"
        )


def _check_rms_norm(x: torch.Tensor, rms_norm, up: torch.Tensor | None) -> None:
    """``rms_norm=(rstd, weight)`` must describe RMSNorm(x): rstd (R,) FP32 and a (C,) weight in
    x's dtype, on x's device, and not together with ``swiglu_up``."""
    if up is not None:
        raise ValueError("rms_norm and swiglu_up: give at most one")
    rstd, weight = rms_norm
    R, C = x.shape
    if rstd.shape != (R,) or rstd.dtype != torch.float32 or rstd.device != x.device:
        raise ValueError(
            f"rms_norm: rstd must be float32 of shape ({R},) on {x.device}, got {rstd.dtype} {tuple(rstd.shape)}"
        )
    if weight.shape != (C,) or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(
            f"rms_norm: weight must be {x.dtype} of shape ({C},) on {x.device}, got {weight.dtype} {tuple(weight.shape)}"
        )


def _operand(x: torch.Tensor, up: torch.Tensor | None, rms_norm=None) -> torch.Tensor:
    """What is quantized: ``x``, the SwiGLU output ``silu(x) * up`` rounded to x's dtype, or the
    RMSNorm output of ``x`` from ``rms_norm=(rstd, weight)``."""
    _check_2d(x)
    if rms_norm is not None:
        _check_rms_norm(x, rms_norm, up)
        rstd, weight = rms_norm
        from .norm_swiglu_reference import rms_norm_with_rstd_reference

        return rms_norm_with_rstd_reference(x, weight, rstd)
    if up is None:
        return x
    _check_swiglu_up(x, up)
    from .norm_swiglu_reference import swiglu_reference

    return swiglu_reference(x, up)


def _check_f32_scalar(name: str, t: torch.Tensor) -> None:
    """Scales and amax slots: FP32 tensors with one element."""
    if t.dtype != torch.float32 or t.numel() != 1:
        raise ValueError(f"{name}: expected a float32 tensor with one element, got {t.dtype} {tuple(t.shape)}")


_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}  # torch.finfo(dtype).max


def _check_fp8(dtype: torch.dtype) -> float:
    fmax = _FP8_MAX.get(dtype)
    if fmax is None:
        raise ValueError(f"fp8_dtype: expected torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")
    return fmax


def amax_to_scale_reference(amax: torch.Tensor, fp8_max: float) -> torch.Tensor:
    """The guarded scale of ``_scale_from_amax``: FP32, correctly rounded division."""
    amax = amax.float()
    ok = (amax > 0) & (amax < float("inf"))
    safe = torch.where(ok, amax.clamp(min=MIN_AMAX), torch.ones_like(amax))
    return torch.where(ok, torch.full_like(amax, fp8_max) / safe, torch.ones_like(amax))


def _amax_reference(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """max|x| with NaN propagation (torch.amax propagates NaN)."""
    a = x.float().abs()
    return a.amax() if dim is None else a.amax(dim=dim)


def _cast_reference(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    fmax = _check_fp8(fp8_dtype)
    x = x.float()
    y = (x * scale).clamp(-fmax, fmax)
    y = torch.where(x.abs() < float("inf"), y, torch.full_like(y, float("nan")))
    return y.to(fp8_dtype)


def _transpose_padded(q: torch.Tensor) -> torch.Tensor:
    R, C = q.shape
    out = torch.zeros((C, pad_to(R)), dtype=q.dtype, device=q.device)
    out[:, :R] = q.t()
    return out


def _set_flag(flag: torch.Tensor | None, amax: torch.Tensor) -> None:
    if flag is not None:
        flag.copy_(torch.where((~(amax < float("inf"))).any(), torch.ones_like(flag), flag))


def quantize_tensorwise_reference(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    *,
    write_y: bool = True,
    write_t: bool = False,
    nonfinite_flag: torch.Tensor | None = None,
    block: object = None,
    swiglu_up: torch.Tensor | None = None,
    rms_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Fp8Quantized:
    x = _operand(x, swiglu_up, rms_norm)
    amax = _amax_reference(x, None)
    scale = amax_to_scale_reference(amax, _check_fp8(fp8_dtype))
    q = _cast_reference(x, scale, fp8_dtype)
    _set_flag(nonfinite_flag, amax)
    return Fp8Quantized(q if write_y else None, _transpose_padded(q) if write_t else None, 1.0 / scale, amax, scale)


def quantize_delayed_reference(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    scale: torch.Tensor,
    amax_slot: torch.Tensor,
    *,
    write_y: bool = True,
    write_t: bool = False,
    nonfinite_flag: torch.Tensor | None = None,
    block: object = None,
    swiglu_up: torch.Tensor | None = None,
    rms_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
    keep_scale: bool = False,
) -> Fp8Quantized:
    x = _operand(x, swiglu_up, rms_norm)
    q = _cast_reference(x, scale, fp8_dtype)
    amax = _amax_reference(x, None)
    kept = scale.clone() if keep_scale else None  # before the caller's buffer moves on
    # NaN must win, as in the kernel's integer max: torch.maximum propagates NaN.
    amax_slot.copy_(torch.maximum(amax_slot, amax))
    _set_flag(nonfinite_flag, amax)
    t = _transpose_padded(q) if write_t else None
    return Fp8Quantized(q if write_y else None, t, 1.0 / scale, amax_slot, kept)


def quantize_with_scale_reference(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    scale: torch.Tensor,
    *,
    write_y: bool = False,
    write_t: bool = True,
    block: object = None,
    swiglu_up: torch.Tensor | None = None,
    rms_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Fp8Quantized:
    x = _operand(x, swiglu_up, rms_norm)
    q = _cast_reference(x, scale, fp8_dtype)
    nan = torch.full((), float("nan"), dtype=torch.float32, device=x.device)
    return Fp8Quantized(q if write_y else None, _transpose_padded(q) if write_t else None, 1.0 / scale, nan)


def quantize_rowwise_reference(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    *,
    nonfinite_flag: torch.Tensor | None = None,
    block: object = None,
    swiglu_up: torch.Tensor | None = None,
) -> Fp8Quantized:
    x = _operand(x, swiglu_up)
    amax = _amax_reference(x, 1)
    scale = amax_to_scale_reference(amax, _check_fp8(fp8_dtype))
    _set_flag(nonfinite_flag, amax)
    return Fp8Quantized(_cast_reference(x, scale[:, None], fp8_dtype), None, 1.0 / scale, amax)


def quantize_colwise_transposed_reference(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    *,
    nonfinite_flag: torch.Tensor | None = None,
    block: object = None,
    swiglu_up: torch.Tensor | None = None,
) -> Fp8Quantized:
    x = _operand(x, swiglu_up)
    amax = _amax_reference(x, 0)
    scale = amax_to_scale_reference(amax, _check_fp8(fp8_dtype))
    _set_flag(nonfinite_flag, amax)
    q = _cast_reference(x, scale[None, :], fp8_dtype)
    return Fp8Quantized(None, _transpose_padded(q), 1.0 / scale, amax)


def delayed_scale_update_reference(
    history: torch.Tensor,
    scale: torch.Tensor,
    slot: int,
    fp8_dtype: torch.dtype,
    *,
    use_max: bool = True,
    margin: int = 0,
    nonfinite_flag: torch.Tensor | None = None,
) -> None:
    col = history[:, slot]
    finite = col.abs() < float("inf")  # non-finite entries (a bad batch) take no part in the max
    amax = torch.where(finite, col, 0.0).amax() if use_max else col[0].clone()
    ok = (amax > 0) & (amax < float("inf"))
    new_scale = amax_to_scale_reference(amax, _check_fp8(fp8_dtype)) * (2.0**-margin)
    scale[slot] = torch.where(ok, new_scale, scale[slot])
    _set_flag(nonfinite_flag, col.abs().amax() if use_max else amax)
    history[:, slot] = torch.roll(col, 1)
    history[0, slot] = 0.0


def delayed_scale_update_many_reference(
    histories: list[torch.Tensor],
    scales: list[torch.Tensor],
    slots: list[int],
    fp8_dtype: torch.dtype,
    *,
    use_max: bool = True,
    margin: int = 0,
    addresses: object = None,
) -> None:
    for h, sc, slot in zip(histories, scales, slots):
        delayed_scale_update_reference(h, sc, slot, fp8_dtype, use_max=use_max, margin=margin)
