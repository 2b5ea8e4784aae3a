"""A training step's forward and backward captured once as a CUDA graph and replayed.

    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="delayed", cuda_graph=True))  # the filter for graphed steps
    step = hf_fp8.CudaGraphStep(model)
    for ids in batches:                      # every batch the same shape
        loss = step(input_ids=ids, labels=ids)   # forward + backward: one graph replay
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

Why: an eager step launches every kernel from Python, and an FP8 layer launches more of them
(casts, scale updates) for less GPU time than a BF16 one. Where the layers are small the
GPU waits for the host: on the lent H100, Llama-3.2-1B shapes (16 layers, B=2, S=4096) with
every decoder linear in FP8 took 134.4-153.8 ms per step eagerly (two runs, two hosts) and
119.6-121.8 ms replayed as a graph (stock BF16 186.3 ms, our eager default with BF16 layers
138.8 ms; ``benchmarks/results/history/llama_graph_1b_h100.json``). With Llama-3-8B shapes the eager
step is already GPU-bound: 176.3 graphed against 173.8 ms eager, 178.0 against 181.9 in another
run (``llama_graph_h100.json``). Converting with
``Fp8Config(cuda_graph=True)`` gives the auto filter the thresholds measured with graphed steps
(every decoder linear of both shapes in FP8). Nothing about the
numerics changes: the graph runs the same kernels on the same data in the same order (delayed
scaling's history updates included: device ops on the layers' own buffers). The optimizer
stays eager (a few fused launches).

What a graph cannot do, and what this class checks (clear errors, nothing silent):

- shapes, dtypes and devices of the batch are fixed at capture (pad or pack to one length);
  non-tensor arguments too;
- the graph *writes* each parameter's gradient, it does not add to it: gradients must be
  ``None`` when a step starts (``optimizer.zero_grad(set_to_none=True)``, the default);
  gradient accumulation over micro-batches is therefore not supported;
- Python inside the forward runs once, at capture: ``Fp8Config(nonfinite="raise")``, whose
  check syncs, is refused;
- a batch with ``attention_mask`` or ``position_ids`` gets the explicit mask transformers builds
  while capturing (correct, but attention measured 3x slower than SDPA's causal path): leave
  them out when every row is one unpadded sequence;
- the step needs a CUDA GPU.

Capture runs ``warmup_iters`` eager forward+backward passes of the first batch on a side stream
first (Triton compiles, cuBLAS handles, delayed scaling's first casts), as CUDA graph capture
requires; their gradients are dropped, and delayed-scaling histories that were already seeded
are restored afterwards, so the first replay starts where an eager step would. The graph keeps
its own memory pool: the lent H100 reserved 27.4 GB for the 8B-shaped model against 26.1 GB
eagerly.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hf_fp8.config import NonFinitePolicy
from hf_fp8.linear import Fp8Linear

__all__ = ["CudaGraphStep"]


def _loss_of(output: Any) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", output)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            f"CudaGraphStep: the model must return a scalar loss (pass labels, or give loss_fn=); got {type(loss).__name__}"
        )
    return loss


def _signature(batch: dict[str, Any]) -> dict[str, Any]:
    """What a replay must match: each tensor's shape, dtype and device; other values as they are."""
    return {
        k: (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else ("value", v)
        for k, v in batch.items()
    }


class CudaGraphStep:
    """``loss = step(**batch)`` runs ``model(**batch)``'s forward and backward as one CUDA graph.

    The first call captures (after ``warmup_iters`` eager passes of that batch); every later
    call copies the batch into the graph's input buffers and replays. Gradients land in each
    parameter's ``.grad`` as ``loss.backward()`` would leave them; the returned loss is a fresh
    tensor (the graph's own is overwritten by the next replay). Then step the optimizer and
    ``zero_grad(set_to_none=True)`` as usual.

    ``loss_fn(output) -> loss`` picks the loss from the model's output (default:
    ``output.loss``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        warmup_iters: int = 2,
        loss_fn: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        if warmup_iters < 1:
            raise ValueError(
                f"warmup_iters must be >= 1 (CUDA graph capture needs an eager pass first), got {warmup_iters}"
            )
        for name, m in model.named_modules():
            if isinstance(m, Fp8Linear) and m.fp8_config.nonfinite is NonFinitePolicy.RAISE:
                raise ValueError(
                    f"CudaGraphStep: {name} has Fp8Config(nonfinite='raise'), whose check waits for the GPU "
                    "inside the forward; a CUDA graph cannot. Use nonfinite='record' and read "
                    "hf_fp8.nonfinite_modules(model) after steps instead."
                )
        self.model = model
        self.warmup_iters = warmup_iters
        self.loss_fn = loss_fn or _loss_of
        self.graph: torch.cuda.CUDAGraph | None = None
        self._static_batch: dict[str, Any] = {}
        self._signature: dict[str, Any] = {}
        self._static_loss: torch.Tensor | None = None
        self._grads: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._training: bool | None = None

    # ------------------------------------------------------------------ checks
    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _check_device(self, batch: dict[str, Any]) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CudaGraphStep needs a CUDA GPU; on this machine run the step eagerly.")
        params = list(self.model.parameters())
        if params and not params[0].is_cuda:
            raise RuntimeError(f"CudaGraphStep: the model is on {params[0].device}; move it to the GPU first.")
        for k, v in batch.items():
            if isinstance(v, torch.Tensor) and not v.is_cuda:
                raise ValueError(f"CudaGraphStep: batch[{k!r}] is on {v.device}; move the batch to the GPU.")

    def _check_no_pending_grads(self) -> None:
        stale = [p for p in self._trainable() if p.grad is not None]
        if stale:
            raise RuntimeError(
                f"CudaGraphStep: {len(stale)} parameters still hold gradients from an earlier step. The graph "
                "writes gradients (it does not add to them), so they would be lost: call "
                "optimizer.zero_grad(set_to_none=True) after each optimizer step. Gradient accumulation "
                "over micro-batches is not supported in a CUDA graph step."
            )

    def _check_same_step(self, batch: dict[str, Any]) -> None:
        sig = _signature(batch)
        if sig != self._signature:
            changed = sorted(k for k in sig.keys() | self._signature.keys() if sig.get(k) != self._signature.get(k))
            raise ValueError(
                f"CudaGraphStep was captured for {self._signature}; this batch differs in {changed}. A CUDA graph "
                "has fixed shapes: pad or pack every batch to one shape, or build a new CudaGraphStep."
            )
        if self.model.training != self._training:
            raise RuntimeError("CudaGraphStep: the model's train/eval mode changed since capture.")
        now = self._trainable()  # by identity: == on Parameters would compare their values
        if len(now) != len(self._grads) or any(p is not q for (p, _), q in zip(self._grads, now, strict=True)):
            raise RuntimeError("CudaGraphStep: the set of trainable parameters changed since capture.")

    # ----------------------------------------------------------------- capture
    def _forward_backward(self, batch: dict[str, Any]) -> torch.Tensor:
        loss = self.loss_fn(self.model(**batch))
        loss.backward()
        return loss

    def _capture(self, batch: dict[str, Any]) -> None:
        self._check_no_pending_grads()
        self._static_batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        self._signature = _signature(batch)
        self._training = self.model.training
        delayed = _seeded_delayed_state(self.model)

        masks = _MaskAsInEager(self.model, batch)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), masks.recording():
            for _ in range(self.warmup_iters):
                self._forward_backward(self._static_batch)
                for p in self._trainable():
                    p.grad = None
        torch.cuda.current_stream().wait_stream(side)
        _restore_delayed_state(delayed)
        # the warm-up's activations sit in the allocator's cache; the graph takes its own pool
        gc.collect()
        torch.cuda.empty_cache()

        graph = torch.cuda.CUDAGraph()
        try:
            with masks.capturing(), torch.cuda.graph(graph):
                loss = self._forward_backward(self._static_batch)
        except RuntimeError as e:  # torch.AcceleratorError is a RuntimeError
            if "captur" not in str(e):
                raise
            attention = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
            hint = (
                " This model uses attn_implementation='eager', whose mask transformers builds from host values: "
                "use 'sdpa' (model.set_attn_implementation('sdpa'))."
                if attention == "eager"
                else ""
            )
            raise RuntimeError(
                f"CudaGraphStep: CUDA graph capture failed ({str(e).splitlines()[0]}). Something in the "
                "forward or backward synchronizes with the host, copies from host memory or uses the default "
                f"stream.{hint} Another cause: an output or loss of an earlier eager step of this model still "
                "alive (a `loss` variable) keeps each parameter's gradient accumulator bound to the default "
                "stream; delete such references (or build the step before any eager step) and call again."
            ) from e
        self._static_loss = loss.detach()
        params = self._trainable()
        missing = [p for p in params if p.grad is None]
        if missing:
            raise RuntimeError(
                f"CudaGraphStep: {len(missing)} trainable parameters got no gradient in the captured backward; "
                "freeze them (requires_grad_(False)) so the graph's gradients cover every trainable parameter."
            )
        self._grads = [(p, p.grad) for p in params]
        self.graph = graph

    # -------------------------------------------------------------------- step
    def forward_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """A causal-LM step on ``ids`` (labels = inputs), as the benchmarks run it."""
        return self(input_ids=ids, labels=ids)

    def __call__(self, **batch: Any) -> torch.Tensor:
        self._check_device(batch)
        # a replay runs none of the model's hooks: a deferred optimizer update attached to the model
        # (hf_fp8.optim.AdamW(defer_step=True).attach) runs here, before the graph reads the weights
        for hook in tuple(self.model._forward_pre_hooks.values()):
            if getattr(hook, "_hf_fp8_flush", False):
                hook(self.model, ())
        if self.graph is None:
            self._capture(batch)
        else:
            self._check_no_pending_grads()
            self._check_same_step(batch)
            for k, v in batch.items():
                if isinstance(v, torch.Tensor):
                    self._static_batch[k].copy_(v)
        self.graph.replay()
        for p, g in self._grads:
            p.grad = g
        return self._static_loss.clone()


def _seeded_delayed_state(model: nn.Module) -> list[tuple[Fp8Linear, list[int], torch.Tensor, torch.Tensor]]:
    """Copies of the delayed-scaling buffers of every layer with a seeded slot, and which slots.

    Slots not yet seeded keep what the warm-up gave them: their first cast seeds from the
    current amax, and the warm-up ran on the batch the first replay runs on, so the history
    holds that batch's amax (repeated, which the max and most-recent rules ignore). Slots a
    layer never casts itself (k/v and up read q's and gate's input cast) stay unseeded."""
    saved = []
    for m in model.modules():
        state = getattr(m, "_fp8_delayed", None)
        if isinstance(m, Fp8Linear) and state is not None and any(state.seeded):
            slots = [i for i, seeded in enumerate(state.seeded) if seeded]
            saved.append((m, slots, state.history.detach().clone(), state.scale.detach().clone()))
    return saved


def _restore_delayed_state(saved: list[tuple[Fp8Linear, list[int], torch.Tensor, torch.Tensor]]) -> None:
    for m, slots, history, scale in saved:
        state = m._fp8_delayed
        for slot in slots:  # integer indices: views and device copies only, no index tensor from the host
            state.history[:, slot].copy_(history[:, slot])
            state.scale[slot].copy_(scale[slot])
        state.pending = [False, False, False]


class _MaskAsInEager:
    """Makes the capture build the attention mask the eager warm-up built: none, when it built none.

    Without ``position_ids`` and ``attention_mask`` the model numbers positions 0..S-1 itself, so
    transformers' mask builder returns no mask in eager mode and SDPA runs with ``is_causal=True``.
    Some of its checks read the data (the packed-sequence check), so during a capture transformers
    skips them and builds an explicit (B, 1, S, S) mask instead: attention measured 3x slower
    (cuDNN's flash backward 40 vs 12.5 ms per step at S=4096). The warm-up records what the mask
    function of the model's attention returned; if it was always nothing, the capture gets
    nothing too. With either argument given, the mask depends on the data and is built inside
    the graph, as transformers builds it."""

    def __init__(self, model: nn.Module, batch: dict[str, Any]) -> None:
        self.key = getattr(getattr(model, "config", None), "_attn_implementation", None)
        self.applies = self.key is not None and "attention_mask" not in batch and "position_ids" not in batch
        self.eager_results: list[bool] = []  # per call in the warm-up: True when no mask was built

    @contextlib.contextmanager
    def _wrapped(self, make_wrapper):
        try:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        except ImportError:
            yield
            return
        if not self.applies or self.key not in ALL_MASK_ATTENTION_FUNCTIONS:
            yield
            return
        original = ALL_MASK_ATTENTION_FUNCTIONS[self.key]
        ALL_MASK_ATTENTION_FUNCTIONS[self.key] = make_wrapper(original)
        try:
            yield
        finally:
            ALL_MASK_ATTENTION_FUNCTIONS[self.key] = original

    def recording(self):
        def make(original):
            def record(*args, **kwargs):
                mask = original(*args, **kwargs)
                self.eager_results.append(mask is None)
                return mask

            return record

        return self._wrapped(make)

    def capturing(self):
        if not (self.eager_results and all(self.eager_results)):
            return contextlib.nullcontext()
        return self._wrapped(lambda original: lambda *args, **kwargs: None)
