"""FP32 logits and loss without the full FP32 logits tensor: chunked linear + cross-entropy.

For each block of tokens (1024 at Llama-3's vocabulary) the lm_head GEMM takes the model-dtype
(BF16) operands and writes FP32 logits into one block buffer (FP32 accumulation, no BF16
rounding of the logits); the loss and the logits gradient come out of one fused kernel, which
writes each row's gradient (in the weight's dtype) over the start of that row's FP32 logits,
after reading them. The hidden states' gradient rows of the block are then one GEMM (exact:
rows are independent) and the lm_head weight's gradient gets the block's ``gᵀ h`` added (FP32
accumulation inside the GEMM, rounded once per block into the weight-dtype gradient, as
gradient accumulation over micro-batches rounds once per micro-batch); both GEMMs read the
gradient where the kernel left it (row stride: one FP32 row). Everything is computed in the
forward; the backward only scales (in place).

Memory alive at the end of the forward, when every activation of the model still is: the
weight gradient (which training needs anyway) and one block of FP32 logits. At Llama-3 sizes
(vocab 128256, BF16, 8192 tokens) that is 1.05 GB + 525 MB, as much as the 512-token logits
chunk plus the separate 1024-token BF16 gradient block it replaces, whose logits GEMM ran in
two halves: 14.7 ms against 13.5 ms for 1024-token GEMMs on the H100. One whole-batch block
would hold 4.2 GB of logits; HF holds the BF16 logits, their FP32 copy and the FP32 softmax.

Why not accumulate per chunk, or in FP32: a chunk has a few hundred tokens at Llama-3 vocab
sizes, and accumulating ``dW += gᵀ h`` into an FP32 (vocab x hidden) accumulator reads and
writes it whole for each K≈500 GEMM: measured on the H100 (B=2, S=4096, vocab 128256) 64.6 ms
for the loss against 50.8 ms for HF's BF16 path. Blocks of ~1000 tokens accumulate 8 times per
step into the BF16 gradient: the loss alone (fwd+bwd, B=2, S=4096, vocab 128256) took 44.9 ms
and 1.64 GB at 512-token chunks and 1024-token blocks (two buffers), against 42.1 ms and
3.22 GB with one block; 256-token chunks cost 50.6 ms (``benchmarks/results/history/loss_blocks_h100.json``).

Semantics are HF's ``ForCausalLMLoss``: labels are shifted left by one (or ``shift_labels``
is used as given), ``ignore_index`` tokens count for nothing, and the loss is the mean over
counted tokens, or the sum divided by ``num_items_in_batch`` when that is given (gradient
accumulation across micro-batches).
"""

from __future__ import annotations

import torch

from hf_fp8._backend import compile_time_constant

__all__ = ["CHUNK_BYTES", "GRAD_BLOCK_BYTES", "chunked_linear_cross_entropy", "mm_fp32_out"]

# Defaults of chunked_linear_cross_entropy's chunk_size and grad_block_size, in bytes of FP32
# logits per chunk and per block (module-wide: the patched models use them). One chunk per
# block: 1024 tokens at vocab 128256, whose logits GEMM ran 7% faster than two of 512 (H100).
CHUNK_BYTES = 1 << 29
GRAD_BLOCK_BYTES = 1 << 29


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


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` with FP32 accumulation and an FP32 result, for BF16/FP16/FP32 operands
    (written into ``out``, FP32 of the result's shape, when given).

    On CUDA the low-precision operands go straight to the tensor cores (``out_dtype``); on CPU
    they are upcast first, which computes the same products (exact in FP32) and sums.
    """
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b if out is None else torch.mm(a, b, out=out)
    if a.is_cuda and a.dtype == b.dtype and _has_dtype_gemm():
        if out is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return a.float() @ b.float() if out is None else torch.mm(a.float(), b.float(), out=out)


def _ce(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, grad_out: torch.Tensor, ignore_index: int):
    from hf_fp8._backend import _override, _triton_available

    use_triton = _override == "triton" or (_override == "auto" and logits.is_cuda and _triton_available())
    if use_triton:
        from hf_fp8.kernels.cross_entropy import ce_fwd_bwd

        return ce_fwd_bwd(logits, labels, scale, grad_out.dtype, ignore_index, grad_out=grad_out)
    from hf_fp8.kernels.cross_entropy_reference import ce_fwd_bwd_reference

    return ce_fwd_bwd_reference(logits, labels, scale, grad_out.dtype, ignore_index, grad_out=grad_out)


def _loss_and_grads(hidden, weight, bias, labels, scale, chunk_size, block_size, ignore_index, need_h, need_w, need_b):
    """(scaled loss, dLoss/dhidden, dLoss/dweight, dLoss/dbias), the gradients None where not needed.

    Autocast (the Trainer's ``--bf16``) is off in here: the loss keeps its own precisions (FP32
    logits, gradients in the weight's dtype); under it the logits GEMM would run in BF16."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _loss_and_grads_exact(
            hidden, weight, bias, labels, scale, chunk_size, block_size, ignore_index, need_h, need_w, need_b
        )


def _loss_and_grads_exact(
    hidden, weight, bias, labels, scale, chunk_size, block_size, ignore_index, need_h, need_w, need_b
):
    N, V = hidden.shape[0], weight.shape[0]
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    need_any = need_h or need_w or need_b
    # without any gradient to compute (an eval loss) one chunk's buffer is reused for everything
    block_size = max(1, min(N, block_size if need_any else chunk_size))
    # One block's FP32 logits; each row's gradient (in the weight's dtype) overwrites the start
    # of that row's logits (the CE kernel reads a row before writing it), so the GEMMs read the
    # gradient rows with a stride of a whole FP32 row.
    logits_buf = torch.empty((block_size, V), dtype=torch.float32, device=hidden.device)
    grad_logits = logits_buf.view(weight.dtype)[:, :V]
    grad_h = torch.empty(hidden.shape, dtype=weight.dtype, device=hidden.device) if need_h else None
    grad_w = None
    grad_b = torch.zeros((V,), dtype=torch.float32, device=hidden.device) if need_b else None
    w_t = weight.t()
    for block in range(0, N, block_size):
        n_block = min(block_size, N - block)
        for start in range(block, block + n_block, chunk_size):
            n = min(chunk_size, block + n_block - start)
            rows = slice(start - block, start - block + n)
            logits = mm_fp32_out(hidden[start : start + n], w_t, out=logits_buf[rows])
            if bias is not None:
                logits += bias.float()
            chunk_loss, _ = _ce(logits, labels[start : start + n], scale, grad_logits[rows], ignore_index)
            del logits
            loss += chunk_loss.sum()
        if not need_any:
            continue
        g = grad_logits[:n_block]
        if not g.is_cuda and not g.is_contiguous():
            # oneDNN's AMX BF16 GEMM (torch 2.13 CPU on Sapphire Rapids) reads each row of A up to
            # K rounded to its tile, i.e. into this view's stride, where the rest of the FP32
            # logits lie; NaN bit patterns there times its zero padding gave NaN gradient rows.
            # cuBLAS reads only the K columns, so the GPU keeps the strided view.
            g = g.contiguous()
        if need_h:  # rows are independent: no sum across blocks
            torch.mm(g, weight, out=grad_h[block : block + n_block])
        if need_w:  # FP32 accumulation inside each block's GEMM, one rounding per block
            h = hidden[block : block + n_block].to(weight.dtype)
            grad_w = g.t() @ h if grad_w is None else grad_w.addmm_(g.t(), h)
        if need_b:
            grad_b += g.float().sum(0)
    if need_w and grad_w is None:  # no tokens: a zero gradient, as one GEMM over none gives
        grad_w = torch.zeros_like(weight)
    if grad_h is not None:
        grad_h = grad_h.to(hidden.dtype)
    return loss * scale, grad_h, grad_w, grad_b


def _scale_grads(grad_loss, grad_h, grad_w, grad_b, b_dtype, in_place=False):
    # a 0-d FP32 multiplier keeps the gradient's dtype and multiplies in FP32: one rounding;
    # in place where the caller owns the gradients (no second (vocab x hidden) buffer alive
    # at the start of the backward, when every activation still is)
    def mul(g):
        return None if g is None else (g.mul_(grad_loss) if in_place else g * grad_loss)

    out_b = mul(grad_b)
    return mul(grad_h), mul(grad_w), out_b.to(b_dtype) if out_b is not None else None


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and all gradients in the forward (the loss ends the graph), scaled in backward.

    The gradients are held on ``ctx`` (not ``save_for_backward``: they are neither inputs nor
    outputs) and handed over, scaled in place, by the one backward this node allows."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, scale, chunk_size, block_size, ignore_index):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        loss, *grads = _loss_and_grads(
            hidden, weight, bias, labels, scale, chunk_size, block_size, ignore_index, need_h, need_w, need_b
        )
        ctx.grads = grads
        ctx.b_dtype = bias.dtype if bias is not None else None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "chunked_linear_cross_entropy: backward ran twice through the same loss (retain_graph=True?). "
                "Its gradients are computed in the forward and handed over by the first backward; compute the "
                "loss again for a second one."
            )
        return (*_scale_grads(grad_loss, *grads, ctx.b_dtype, in_place=True), None, None, None, None, None)


# torch.compile: the chunk loop and the Triton kernel run as one opaque custom op.
@torch.library.custom_op("hf_fp8::chunked_linear_cross_entropy", mutates_args=())
def _chunked_ce_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    scale: torch.Tensor,
    chunk_size: int,
    block_size: int,
    ignore_index: int,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out = _loss_and_grads(
        hidden, weight, bias, labels, scale, chunk_size, block_size, ignore_index, need_h, need_w, need_b
    )
    return tuple(t if t is not None else hidden.new_empty(0) for t in out)


@_chunked_ce_op.register_fake
def _(hidden, weight, bias, labels, scale, chunk_size, block_size, ignore_index, need_h, need_w, need_b):
    empty = hidden.new_empty(0)
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty(hidden.shape) if need_h else empty,
        weight.new_empty(weight.shape) if need_w else empty,
        hidden.new_empty((weight.shape[0],), dtype=torch.float32) if need_b else empty,
    )


def _ce_setup(ctx, inputs, output):
    need_h, need_w, need_b = inputs[8:11]
    ctx.need = (need_h, need_w, need_b)
    ctx.b_dtype = inputs[2].dtype if inputs[2] is not None else None
    ctx.save_for_backward(*output[1:])


def _ce_op_backward(ctx, grad_loss, *_):
    grads = [g if need else None for g, need in zip(ctx.saved_tensors, ctx.need)]
    return (*_scale_grads(grad_loss, *grads, ctx.b_dtype), None, None, None, None, None, None, None, None)


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
    grad_block_size: int | None = None,
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
        chunk_size (`int`, *optional*): tokens per logits GEMM; default keeps a chunk's FP32
            logits near :data:`CHUNK_BYTES` (512 MiB: 1024 tokens at vocab 128256).
        grad_block_size (`int`, *optional*): tokens whose FP32 logits, then logits gradient (in
            the weight's dtype, written over them), are held at once; default keeps a block near
            :data:`GRAD_BLOCK_BYTES` (512 MiB: 1024 tokens at vocab 128256), rounded to whole
            chunks. The weight
            gradient is one GEMM per block, summed in the weight's dtype: one rounding per
            block, the rounding gradient accumulation over micro-batches of that many tokens
            has. Give the token count (or more) for one block: one rounding, and a
            (tokens x vocab) buffer alive until the end of the loss.

    Returns:
        `torch.Tensor`: 0-d FP32 loss. NaN if no token is counted and ``num_items_in_batch`` is
        None (as ``torch.nn.functional.cross_entropy`` gives).
    """
    if (labels is None) == (shift_labels is None):
        raise ValueError("chunked_linear_cross_entropy: give exactly one of labels and shift_labels")
    H = hidden_states.shape[-1]
    if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"weight: expected a BF16, FP16 or FP32 lm_head weight, got {weight.dtype}")
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
    V = weight.shape[0]
    if chunk_size is None:
        chunk_size = max(16, min(4096, CHUNK_BYTES // (4 * max(1, V))))
        if chunk_size >= 128:  # whole GEMM tiles (261 tokens at vocab 128256 would leave a ragged 5-row tile)
            chunk_size -= chunk_size % 128
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    if grad_block_size is None:
        per_block = GRAD_BLOCK_BYTES // (4 * max(1, V))
        grad_block_size = max(chunk_size, per_block - per_block % chunk_size)
    if grad_block_size < 1:
        raise ValueError(f"grad_block_size: expected >= 1, got {grad_block_size}")
    if torch.compiler.is_compiling():
        grad = torch.is_grad_enabled()
        need_b = bias is not None and grad and bias.requires_grad
        out = _chunked_ce_op(
            hidden, weight, bias, flat_labels, scale, chunk_size, grad_block_size, ignore_index,
            grad and hidden.requires_grad, grad and weight.requires_grad, need_b,
        )  # fmt: skip
        return out[0]
    return _ChunkedLinearCrossEntropy.apply(
        hidden, weight, bias, flat_labels, scale, chunk_size, grad_block_size, ignore_index
    )
