"""Cross-entropy forward and logits-gradient in one kernel over an FP32 logits chunk.

Math, per row i of an FP32 logits chunk x (C, V) with label y_i and a scale s (1 / number
of counted tokens)::

    lse_i    = log(sum_j exp(x_ij))                     (online max/sum, FP32)
    loss_i   = lse_i - x_{i,y_i}                        (0 where y_i == ignore_index)
    dx_ij    = s * (exp(x_ij - lse_i) - [j == y_i])     (0 rows where y_i == ignore_index)

One program per row: a first pass over V computes the running max and sum, a second pass
writes the gradient in the dtype the next GEMM takes (BF16 for a BF16 lm_head). Against
the same computation in eager torch (logsumexp, exp, subtract, scale, cast: five passes
over C x V FP32) this reads the chunk twice and writes the gradient once.

Reference: Liger-Kernel's fused linear cross-entropy (the chunking idea); the Triton
softmax tutorial (online normalizer, Milakov & Gimelshein 2018).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import interpreting, launch, next_power_of_2
from .cross_entropy_reference import ce_fwd_bwd_reference

__all__ = ["ce_fwd_bwd", "ce_fwd_bwd_reference"]


@triton.jit
def _ce_fwd_bwd_kernel(
    x_ptr,  # (C, V) fp32
    labels_ptr,  # (C,) int64
    scale_ptr,  # () fp32
    loss_ptr,  # (C,) fp32
    grad_ptr,  # (C, V) grad dtype
    V,
    stride_x,
    stride_g,
    IGNORE_INDEX: tl.constexpr,
    BARRIERS: tl.constexpr,  # grad overwrites x's memory: 1 a barrier per block, 2 at blocks 0, 1, 2, 4, ...
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    g_row = grad_ptr + row * stride_g
    label = tl.load(labels_ptr + row)
    scale = tl.load(scale_ptr)
    ignored = label == IGNORE_INDEX
    cols = tl.arange(0, BLOCK_V)

    # pass 1: online max and sum of exp
    m = tl.full([], float("-inf"), tl.float32)
    d = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(x_row + start + cols, mask=start + cols < V, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    safe_label = tl.where(ignored, 0, label)
    x_label = tl.load(x_row + safe_label)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - x_label))

    # pass 2: the gradient of the scaled loss with respect to the logits
    row_scale = tl.where(ignored, 0.0, scale)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(x_row + start + cols, mask=mask, other=0.0)
        if BARRIERS == 1:
            tl.debug_barrier()
        elif BARRIERS == 2:
            # Block k's gradient lies over FP32 columns < (k + 1) * BLOCK_V / 2 (a narrower
            # dtype; over its own columns in FP32), which blocks <= k / 2 read (rounded up).
            # A barrier after block j's loads means every warp has read blocks <= j; with
            # barriers at j = 0 and the powers of two, block k in [2^m, 2^(m+1)) follows the
            # one at 2^m >= (k + 1) / 2: nothing is overwritten before every warp read it.
            k = start // BLOCK_V
            if (k & (k - 1)) == 0:
                tl.debug_barrier()
        g = tl.exp(x - lse) - tl.where(start + cols == label, 1.0, 0.0)
        tl.store(g_row + start + cols, (g * row_scale).to(grad_ptr.dtype.element_ty), mask=mask)


# In place, the barriers that keep a warp from overwriting logits another warp has not read:
# 1 after every block's loads, 2 after blocks 0, 1, 2, 4, 8, ... (enough for a narrower
# gradient, see the kernel; an FP32 gradient lands on the block just read and takes 1)
IN_PLACE_BARRIERS = 2


def _barriers(in_place: bool, grad: torch.Tensor) -> int:
    if not in_place:
        return 0
    return IN_PLACE_BARRIERS if grad.element_size() < 4 else 1


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges that two tensors span intersect."""

    def span(t):
        start = t.data_ptr()
        return start, start + ((t.shape[0] - 1) * t.stride(0) + t.shape[1]) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a.numel() > 0 and b.numel() > 0 and a0 < b1 and b0 < a1


def ce_fwd_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    grad_dtype: torch.dtype,
    ignore_index: int = -100,
    grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (C,) FP32 and the scaled logits gradient (C, V) in ``grad_dtype``
    (written into ``grad_out``, (C, V) with unit column stride, when given).

    ``grad_out`` may overwrite ``logits`` in place: starting at the same address, each gradient
    row over the start of its own logits row (``logits.view(grad_dtype)[:, :V]``); the chunked
    loss does so to hold one buffer instead of two.

    Args:
        logits (`torch.Tensor`): (C, V) float32, unit stride along V.
        labels (`torch.Tensor`): (C,) int64, ``ignore_index`` rows contribute nothing.
        scale (`torch.Tensor`): 0-d float32 multiplier of the gradient (1 / counted tokens).
    """
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(
            f"logits: expected a (C, V) float32 tensor with unit column stride, got {logits.dtype} "
            f"{tuple(logits.shape)}"
        )
    C, V = logits.shape
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)
    if grad_out is None:
        grad = torch.empty((C, V), dtype=grad_dtype, device=logits.device)
    elif grad_out.shape != (C, V) or grad_out.dtype != grad_dtype or grad_out.stride(1) != 1:
        raise ValueError(
            f"grad_out: expected ({C}, {V}) {grad_dtype} with unit column stride, got {grad_out.dtype} "
            f"{tuple(grad_out.shape)}"
        )
    else:
        grad = grad_out
    in_place = _overlaps(grad, logits)
    if in_place and not (
        grad.data_ptr() == logits.data_ptr() and grad.stride(0) * grad.element_size() == 4 * logits.stride(0)
    ):
        raise ValueError(
            "grad_out: may share memory with logits only as their in-place gradient (same start, same row stride in bytes)"
        )
    interp = interpreting()
    BLOCK_V = min(next_power_of_2(V), 65536 if interp else 4096)
    launch(
        _ce_fwd_bwd_kernel,
        (C,),
        (
            logits,
            labels,
            scale,
            loss,
            grad,
            V,
            logits.stride(0),
            grad.stride(0),
        ),
        dict(IGNORE_INDEX=ignore_index, BARRIERS=_barriers(in_place, grad), BLOCK_V=BLOCK_V),
        8 if not interp else 1,
    )
    return loss, grad
