"""The input embedding with hf_fp8's weight-gradient kernel (:mod:`hf_fp8.kernels.embedding`).

The forward is torch's lookup; the backward writes the (vocab x hidden) weight gradient in one
pass (zeros and per-id FP32 sums together) instead of torch's fill, sort and segment kernels.
The sums are FP32 and rounded once, as torch's are; only their order within an id may differ
(token order here), so results agree to the last bit or within one BF16 rounding.

Applies (:func:`embedding_fusable`) to a plain ``nn.Embedding`` (no ``max_norm``, no
``scale_grad_by_freq``, not sparse) whose weight trains, where the Triton kernels run (a GPU),
in eager mode; anything else is ``nn.Embedding``'s own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_fp8._backend import use_triton

__all__ = ["embedding_fusable", "embedding_lookup", "embedding_weight_grad", "ENABLED"]

# Benchmarks and tests flip this to measure or compare torch's backward.
ENABLED = True


def embedding_fusable(module: nn.Module, ids: torch.Tensor) -> bool:
    """Whether ``module``'s forward may run :func:`embedding_lookup` on ``ids``."""
    w = module.weight
    return (
        ENABLED
        and type(module) is nn.Embedding
        and not torch.compiler.is_compiling()
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
        and w.requires_grad
        and torch.is_grad_enabled()
        and w.is_floating_point()
        and not ids.is_floating_point()
        and ids.numel() > 0
        and use_triton(w)  # elsewhere torch's own backward (the reference is for the tests)
    )


def embedding_weight_grad(
    grad: torch.Tensor, ids: torch.Tensor, num_embeddings: int, padding_idx: int | None
) -> torch.Tensor:
    """(V, H) gradient of ``weight[ids]``: the Triton kernel on GPUs, its torch reference elsewhere."""
    if use_triton(grad):
        from hf_fp8.kernels.embedding import embedding_backward

        return embedding_backward(grad, ids, num_embeddings, padding_idx)
    from hf_fp8.kernels.embedding_reference import embedding_backward_reference

    return embedding_backward_reference(grad, ids, num_embeddings, padding_idx)


class _EmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx):
        ctx.save_for_backward(ids)
        ctx.num_embeddings, ctx.padding_idx = weight.shape[0], padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None
        return None, embedding_weight_grad(grad, ids, ctx.num_embeddings, ctx.padding_idx), None


def embedding_lookup(module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """``module(ids)`` with :func:`embedding_weight_grad` as the weight's backward (caller checked
    :func:`embedding_fusable`)."""
    return _EmbeddingFunction.apply(ids, module.weight, module.padding_idx)
