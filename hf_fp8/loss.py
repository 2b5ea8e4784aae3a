"""FP32 logits and loss without the full FP32 logits tensor: chunked linear + cross-entropy.

For each chunk of tokens the lm_head GEMM takes the model-dtype (BF16) operands and writes
FP32 logits (FP32 accumulation, no BF16 rounding of the logits); the loss and the logits
gradient come out of one fused kernel, which writes the gradient (in the weight's dtype) into
one (tokens x vocab) buffer. After the last chunk, the gradients of the hidden states and of
the lm_head weight are each one GEMM over all tokens (FP32 accumulation inside the GEMM, one
rounding). Peak memory: that BF16 gradient buffer plus one (chunk x vocab) FP32 block, where
HF keeps the BF16 logits, their FP32 copy and the FP32 softmax for backward.

Why one weight-gradient GEMM rather than accumulating per chunk: a chunk has ~500 tokens at
Llama-3 vocab sizes, so accumulating ``dW += gᵀ h`` per chunk reads and writes the whole
FP32 (vocab x hidden) accumulator for a K=500 GEMM, 16 times per step: measured on the H100
(B=2, S=4096, vocab 128256) 64.6 ms for the loss against 50.8 ms for HF's BF16 path.

Semantics are HF's ``ForCausalLMLoss``: labels are shifted left by one (or ``shift_labels``
is used as given), ``ignore_index`` tokens count for nothing, and the loss is the mean over
counted tokens, or the sum divided by ``num_items_in_batch`` when that is given (gradient
accumulation across micro-batches).
"""

from __future__ import annotations

import torch

from hf_fp8._backend import compile_time_constant

__all__ = ["chunked_linear_cross_entropy", "mm_fp32_out"]


_DTYPE_GEMM: list[bool] = []


@compile_time_constant  # a fact of the process, cached by hand (see hf_fp8._backend)
def _has_dtype_gemm() -> bool:
    if not _DTYPE_GEMM:
        ok = False
        if torch.cuda.is_available():
            try:
                a = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
                ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
            except (RuntimeError, TypeError):
                ok = False
        _DTYPE_GEMM.append(ok)
    return _DTYPE_GEMM[0]


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with FP32 accumulation and an FP32 result, for BF16/FP16/FP32 operands.

    On CUDA the low-precision operands go straight to the tensor cores (``out_dtype``); on CPU
    they are upcast first, which computes the same products (exact in FP32) and sums.
    """
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype and _has_dtype_gemm():
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _ce(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, grad_out: torch.Tensor, ignore_index: int):
    from hf_fp8._backend import _override, _triton_available

    use_triton = _override == "triton" or (_override == "auto" and logits.is_cuda and _triton_available())
    if use_triton:
        from hf_fp8.kernels.cross_entropy import ce_fwd_bwd

        return ce_fwd_bwd(logits, labels, scale, grad_out.dtype, ignore_index, grad_out=grad_out)
    from hf_fp8.kernels.cross_entropy_reference import ce_fwd_bwd_reference

    return ce_fwd_bwd_reference(logits, labels, scale, grad_out.dtype, ignore_index, grad_out=grad_out)


def _loss_and_grads(hidden, weight, bias, labels, scale, chunk_size, ignore_index, need_h, need_w, need_b):
    """(scaled loss, dLoss/dhidden, dLoss/dweight, dLoss/dbias), the gradients None where not needed."""
    N = hidden.shape[0]
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    # dLoss/dlogits of every token, in the dtype the gradient GEMMs take (without any
    # gradient to compute, e.g. an eval loss, one chunk's worth is reused instead)
    rows = N if (need_h or need_w or need_b) else min(N, chunk_size)
    grad_logits = torch.empty((rows, weight.shape[0]), dtype=weight.dtype, device=hidden.device)
    w_t = weight.t()
    for start in range(0, N, chunk_size):
        logits = mm_fp32_out(hidden[start : start + chunk_size], w_t)
        if bias is not None:
            logits += bias.float()
        n = logits.shape[0]
        g = grad_logits[start : start + n] if rows == N else grad_logits[:n]
        chunk_loss, _ = _ce(logits, labels[start : start + n], scale, g, ignore_index)
        del logits
        loss += chunk_loss.sum()
    grad_h = (grad_logits @ weight).to(hidden.dtype) if need_h else None
    grad_w = grad_logits.t() @ hidden.to(weight.dtype) if need_w else None
    grad_b = grad_logits.float().sum(0) if need_b else None
    return loss * scale, grad_h, grad_w, grad_b


def _scale_grads(grad_loss, grad_h, grad_w, grad_b, b_dtype):
    # a 0-d FP32 multiplier keeps the gradient's dtype and multiplies in FP32: one rounding
    out_h = grad_h * grad_loss if grad_h is not None else None
    out_w = grad_w * grad_loss if grad_w is not None else None
    out_b = (grad_b * grad_loss).to(b_dtype) if grad_b is not None else None
    return out_h, out_w, out_b


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and all gradients in the forward (the loss ends the graph), scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, scale, chunk_size, ignore_index):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        loss, grad_h, grad_w, grad_b = _loss_and_grads(
            hidden, weight, bias, labels, scale, chunk_size, ignore_index, need_h, need_w, need_b
        )
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.b_dtype = bias.dtype if bias is not None else None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return (*_scale_grads(grad_loss, *ctx.saved_tensors, ctx.b_dtype), None, None, None, None)


# torch.compile: the chunk loop and the Triton kernel run as one opaque custom op.
@torch.library.custom_op("hf_fp8::chunked_linear_cross_entropy", mutates_args=())
def _chunked_ce_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    scale: torch.Tensor,
    chunk_size: int,
    ignore_index: int,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out = _loss_and_grads(hidden, weight, bias, labels, scale, chunk_size, ignore_index, need_h, need_w, need_b)
    return tuple(t if t is not None else hidden.new_empty(0) for t in out)


@_chunked_ce_op.register_fake
def _(hidden, weight, bias, labels, scale, chunk_size, ignore_index, need_h, need_w, need_b):
    empty = hidden.new_empty(0)
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty(hidden.shape) if need_h else empty,
        weight.new_empty(weight.shape) if need_w else empty,
        hidden.new_empty((weight.shape[0],), dtype=torch.float32) if need_b else empty,
    )


def _ce_setup(ctx, inputs, output):
    need_h, need_w, need_b = inputs[7:10]
    ctx.need = (need_h, need_w, need_b)
    ctx.b_dtype = inputs[2].dtype if inputs[2] is not None else None
    ctx.save_for_backward(*output[1:])


def _ce_op_backward(ctx, grad_loss, *_):
    grads = [g if need else None for g, need in zip(ctx.saved_tensors, ctx.need)]
    return (*_scale_grads(grad_loss, *grads, ctx.b_dtype), None, None, None, None, None, None, None)


_chunked_ce_op.register_autograd(_ce_op_backward, setup_context=_ce_setup)


def chunked_linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """HF's causal-LM loss of ``hidden_states @ weight.T (+ bias)``, with FP32 logits, chunked.

    Args:
        hidden_states (`torch.Tensor`): (..., S, H) final hidden states (after the last norm).
        weight (`torch.Tensor`): (V, H) lm_head weight; ``bias`` (V,) optional.
        labels (`torch.Tensor`): (..., S) token ids; shifted left by one here, as HF does. Or give
            ``shift_labels`` (..., S) already aligned with ``hidden_states``.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): divide the summed loss by this
            instead of averaging over counted tokens (what the Trainer passes under gradient
            accumulation).
        chunk_size (`int`, *optional*): tokens per chunk; default keeps a chunk's FP32 logits
            near 256 MB. The (tokens x vocab) logits gradient in the weight's dtype is held
            whole (HF holds the logits at that size too).

    Returns:
        `torch.Tensor`: 0-d FP32 loss. NaN if no token is counted and ``num_items_in_batch`` is
        None (as ``torch.nn.functional.cross_entropy`` gives).
    """
    if (labels is None) == (shift_labels is None):
        raise ValueError("chunked_linear_cross_entropy: give exactly one of labels and shift_labels")
    H = hidden_states.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight: expected (vocab, {H}), got {tuple(weight.shape)}")
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if shift_labels.shape != hidden_states.shape[:-1]:
        raise ValueError(
            f"labels: shape {tuple(shift_labels.shape)} does not match hidden states {tuple(hidden_states.shape[:-1])}"
        )
    hidden = hidden_states.reshape(-1, H)
    flat_labels = shift_labels.reshape(-1).to(device=hidden.device, dtype=torch.int64)
    if num_items_in_batch is None:
        scale = 1.0 / (flat_labels != ignore_index).sum().to(torch.float32)  # no host sync
    else:
        n = num_items_in_batch if isinstance(num_items_in_batch, torch.Tensor) else torch.tensor(num_items_in_batch)
        scale = 1.0 / n.to(device=hidden.device, dtype=torch.float32)
    if chunk_size is None:
        chunk_size = max(16, min(4096, (1 << 26) // max(1, weight.shape[0])))
        if chunk_size >= 128:  # whole GEMM tiles (523 tokens at vocab 128256 would leave a ragged 11-row tile)
            chunk_size -= chunk_size % 128
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    if torch.compiler.is_compiling():
        grad = torch.is_grad_enabled()
        need_b = bias is not None and grad and bias.requires_grad
        out = _chunked_ce_op(
            hidden, weight, bias, flat_labels, scale, chunk_size, ignore_index,
            grad and hidden.requires_grad, grad and weight.requires_grad, need_b,
        )  # fmt: skip
        return out[0]
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, flat_labels, scale, chunk_size, ignore_index)
