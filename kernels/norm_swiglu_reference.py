"""Torch references (and CPU path) for :mod:`hf_fp8.kernels.norm_swiglu`: HF Llama's RMSNorm and
SwiGLU, computed in FP32 with one rounding to the output dtype."""

from __future__ import annotations

import torch

__all__ = ["rms_norm_reference", "rms_norm_with_rstd_reference", "rms_rstd_reference", "swiglu_reference"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``LlamaRMSNorm``: FP32 statistics, normalized value rounded to x's dtype, times the weight."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed


def rms_rstd_reference(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1/rms per row (all leading dims flattened), FP32, as :func:`rms_norm_reference` computes it."""
    xf = x.reshape(-1, x.shape[-1]).float()
    return torch.rsqrt(xf.pow(2).mean(-1) + eps)


def rms_norm_with_rstd_reference(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """:func:`rms_norm_reference` of a 2-D ``x`` from its given 1/rms per row (same roundings)."""
    normed = (x.float() * rstd[:, None]).to(x.dtype)
    return weight * normed


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in FP32, rounded once to the inputs' dtype (HF rounds silu(gate) first)."""
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)
