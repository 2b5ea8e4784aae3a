"""Torch reference (and CPU path) for :mod:`hf_fp8.kernels.swiglu_quant`: SwiGLU's backward, then
each gradient quantized for its layer, computed the unfused way."""

from __future__ import annotations

import torch

from .norm_swiglu_reference import swiglu_reference
from .quant_reference import (
    Fp8Quantized,
    _check_2d,
    _check_swiglu_up,
    quantize_delayed_reference,
    quantize_tensorwise_reference,
)

__all__ = ["swiglu_backward_reference", "swiglu_backward_quantize_reference"]


def _check_triple(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> None:
    _check_2d(gate, "gate")
    _check_swiglu_up(gate, up)
    if grad.shape != gate.shape or grad.device != gate.device or not grad.is_floating_point():
        raise ValueError(
            f"grad: expected a floating-point tensor of the gate's shape {tuple(gate.shape)} on {gate.device}, "
            f"got {grad.dtype} {tuple(grad.shape)} on {grad.device}"
        )


def swiglu_backward_reference(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """(d gate, d up) of :func:`swiglu_reference`, by autograd (what the unfused CPU path computes)."""
    with torch.enable_grad():
        g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
        return torch.autograd.grad(swiglu_reference(g, u), (g, u), grad)


def swiglu_backward_quantize_reference(
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
    block: object = None,
) -> tuple[Fp8Quantized, Fp8Quantized]:
    _check_triple(grad, gate, up)
    outs = []
    for i, d in enumerate(swiglu_backward_reference(grad, gate, up)):
        kw = dict(write_y=write_y, write_t=write_t, nonfinite_flag=nonfinite_flags[i])
        if scales is None:
            outs.append(quantize_tensorwise_reference(d, fp8_dtype, **kw))
        else:
            outs.append(quantize_delayed_reference(d, fp8_dtype, scales[i], amax_slots[i], **kw))
    return outs[0], outs[1]
