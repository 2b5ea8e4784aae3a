"""Pure-torch reference of :mod:`hf_fp8.kernels.embedding` (CPUs, and the tests' oracle)."""

from __future__ import annotations

import torch

__all__ = ["embedding_backward_reference"]


def embedding_backward_reference(
    grad: torch.Tensor, ids: torch.Tensor, num_embeddings: int, padding_idx: int | None = None
) -> torch.Tensor:
    """The kernel's arithmetic: each id's output-gradient rows summed in FP32 in token order,
    rounded once to grad's dtype; zero rows for ids without tokens and for ``padding_idx``."""
    H = grad.shape[-1]
    g = grad.reshape(-1, H).float()
    flat = ids.reshape(-1).to(torch.int64)
    acc = torch.zeros((num_embeddings, H), dtype=torch.float32, device=grad.device)
    # index_add_ on CPU adds the rows one after another in index order: token order per id
    acc.index_add_(0, flat, g)
    if padding_idx is not None:
        acc[padding_idx] = 0
    return acc.to(grad.dtype)
