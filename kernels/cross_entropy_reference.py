"""Pure-torch reference of :func:`hf_fp8.kernels.cross_entropy.ce_fwd_bwd` (and the CPU path)."""

from __future__ import annotations

import torch

__all__ = ["ce_fwd_bwd_reference"]


def ce_fwd_bwd_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    grad_dtype: torch.dtype,
    ignore_index: int = -100,
    grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (C,) FP32 and the scaled logits gradient (C, V) in ``grad_dtype``
    (written into ``grad_out`` when given)."""
    ignored = labels == ignore_index
    safe = torch.where(ignored, torch.zeros_like(labels), labels)
    lse = torch.logsumexp(logits, dim=-1)
    loss = torch.where(ignored, torch.zeros_like(lse), lse - logits.gather(1, safe[:, None]).squeeze(1))
    grad = torch.exp(logits - lse[:, None])
    grad.scatter_add_(1, safe[:, None], torch.full_like(lse[:, None], -1.0))
    grad = grad * torch.where(ignored, torch.zeros_like(lse), scale)[:, None]
    if grad_out is None:
        return loss, grad.to(grad_dtype)
    grad_out.copy_(grad)
    return loss, grad_out
