"""The input embedding's weight gradient in one pass over the (vocab x hidden) gradient.

torch's dense embedding backward on CUDA zero-fills the whole (V, H) gradient, sorts the token
ids, then sums each id's rows in separate segment kernels (on the H100, Llama-3 vocab 128256,
hidden 4096, 8192 tokens: 0.32 ms of fill and ~0.6 ms of sort and scatter per step,
``benchmarks/results/history/llama_profile_adamw_h100.json``). Here each program owns whole rows of the
gradient and writes every one of them once: zeros for an id no token has, else the FP32 sum of
that id's output-gradient rows, rounded once. The rows of an id are summed in token order (a
stable sort), so the result is deterministic. Traffic: the gradient written once (1.05 GB at
those sizes) and the output gradient read once (67 MB).

The id -> tokens map comes from torch (no host sync, so CUDA graphs can capture it): a
stable argsort of the ids and per-id counts and offsets (scatter-add of ones, cumulative sum).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, interpreting, launch, next_power_of_2
from .embedding_reference import embedding_backward_reference

__all__ = ["embedding_backward", "embedding_backward_reference"]


@triton.jit
def _embedding_bwd_kernel(
    g_ptr,  # (T, H) output gradient, unit column stride
    order_ptr,  # (T,) int64: token indices sorted by id, stable
    start_ptr,  # (V,) int64: first position in order of each id
    count_ptr,  # (V,) int64: tokens per id (0 for ids to leave at zero, e.g. padding_idx)
    dw_ptr,  # (V, H) weight gradient, contiguous
    V,
    H,
    stride_g,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    for i in range(ROWS):
        v = tl.program_id(0).to(tl.int64) * ROWS + i
        if v < V:
            first = tl.load(start_ptr + v)
            n = tl.load(count_ptr + v)
            acc = tl.zeros([BLOCK_H], tl.float32)
            for j in range(first, first + n):
                t = tl.load(order_ptr + j)
                acc += tl.load(g_ptr + t * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dw_ptr + v * H + cols, acc.to(dw_ptr.dtype.element_ty), mask=mask)


def _interpret() -> bool:
    return interpreting()


def embedding_backward(
    grad: torch.Tensor, ids: torch.Tensor, num_embeddings: int, padding_idx: int | None = None
) -> torch.Tensor:
    """d(loss)/d(weight) of ``weight[ids]`` given ``grad`` = d(loss)/d(output): (V, H) in grad's dtype.

    Args:
        grad (`torch.Tensor`): (..., H) gradient of the embedding's output, floating point.
        ids (`torch.Tensor`): (...) int token ids in [0, num_embeddings), the output's leading shape.
        padding_idx (`int`, *optional*): its row's gradient stays zero (``nn.Embedding``'s rule).
    """
    H = grad.shape[-1]
    if ids.shape != grad.shape[:-1]:
        raise ValueError(f"ids: shape {tuple(ids.shape)} does not match the gradient's {tuple(grad.shape[:-1])}")
    g = grad.reshape(-1, H)
    if g.stride(-1) != 1:
        g = g.contiguous()
    flat = ids.reshape(-1).to(torch.int64)
    V = num_embeddings
    dw = torch.empty((V, H), dtype=grad.dtype, device=grad.device)
    order = torch.sort(flat, stable=True).indices
    count = torch.zeros(V, dtype=torch.int64, device=grad.device).scatter_add_(0, flat, torch.ones_like(flat))
    start = torch.cumsum(count, 0) - count
    if padding_idx is not None:
        count[padding_idx] = 0  # its tokens stay in the sorted order; a zero count skips them
    interp = _interpret()
    BLOCK_H = min(next_power_of_2(H), 8192 if interp else 1024)
    ROWS = 1 if interp else 4
    launch(
        _embedding_bwd_kernel,
        (cdiv(V, ROWS), cdiv(H, BLOCK_H)),
        (g, order, start, count, dw, V, H, g.stride(0)),
        dict(ROWS=ROWS, BLOCK_H=BLOCK_H),
        1 if interp else 4,
    )
    return dw
