"""Activation checkpointing that recomputes only the layers memory needs recomputed.

With transformers' activation checkpointing every decoder layer runs its forward twice, and the
recompute is a large share of a checkpointed step. Checkpointing exists to bound the peak, and the
peak of a checkpointed step comes at the end of its backward, when every gradient exists. Until
then the memory those gradients will take is free: during the forward and the start of the
backward (which frees the *last* layers' activations first) it can hold the last layers'
activations instead of recomputing them.

The rule (``Fp8Config.keep_activations="auto"``): at each training forward, the last ``k`` of the
checkpointed layers keep their activations, with ``k * A`` at most the bytes of the layers'
gradients not allocated yet, less the largest layer's gradient bytes (a margin), where ``A`` is a
layer's activation bytes as measured on this device (during a recompute, or a kept forward) for at
least as many tokens as now. While layer ``j`` of the kept ones runs its backward, memory holds the
kept activations of the layers up to ``j`` and the gradients of the layers after it, at most the
budget plus what full recompute holds then; and full recompute's backward ends with every
gradient allocated. So the step's peak stays at or below full recompute's, and the results are the
same bit for bit (a kept layer computes exactly what its recompute would have: see
``tests/test_recompute.py``).

Whenever that argument could fail, ``auto`` keeps nothing (transformers' behaviour): before the
first measurement, for more tokens than measured, when gradients already exist at the forward's
start (gradient accumulation, an update deferred to the next forward, ``zero_grad(set_to_none=False)``),
on a device whose allocator cannot be read (the CPU), with several processes (DDP's gradient
buckets and FSDP's sharded gradients are not the gradients this counts), under ``torch.compile``
or CUDA-graph capture, and for model families not in :mod:`hf_fp8.integrations.families`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from hf_fp8.delayed import in_backward

__all__ = ["RecomputePlan", "install_selective_recompute", "recompute_plans", "remove_selective_recompute"]

_PLAN = "_hf_fp8_recompute"
_HOOK = "_hf_fp8_recompute_hook"


def _allocated_bytes(device: torch.device) -> int | None:
    """Bytes the device's caching allocator has handed out (``None`` where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return None


def _nbytes(p: torch.Tensor) -> int:
    local = getattr(p, "_local_tensor", p)  # a DTensor's gradient is its shard's size
    return local.numel() * local.element_size()


def _tensor_bytes(out: Any) -> int:
    if torch.is_tensor(out):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_tensor_bytes(o) for o in out)
    return 0


def _several_processes() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclasses.dataclass
class RecomputePlan:
    """Which checkpointed decoder layers of one stack skip their recompute, decided at each
    training forward. ``keep``: ``"auto"`` or how many of the last checkpointed layers keep their
    activations (0: every one is recomputed, as transformers does)."""

    layers: list[nn.Module]
    keep: str | int = "auto"
    # the largest activation bytes per element of a layer's input measured so far, and the most
    # input elements a measurement covered (estimates are never extrapolated beyond it)
    bytes_per_element: float = 0.0
    measured_elements: int = 0
    # this forward's decision (None: not decided yet) and why
    kept: set[int] | None = None
    last_kept: int = 0
    last_checkpointed: int = 0
    last_reason: str = "no training forward yet"

    # ---- decision ------------------------------------------------------------------------
    def decide(self, elements: int, device: torch.device) -> None:
        checkpointed = [i for i, layer in enumerate(self.layers) if getattr(layer, "gradient_checkpointing", False)]
        k, reason = self._how_many(len(checkpointed), elements, device)
        self.kept = {id(self.layers[i]) for i in checkpointed[len(checkpointed) - k :]} if k else set()
        self.last_kept, self.last_checkpointed, self.last_reason = k, len(checkpointed), reason

    def _how_many(self, n: int, elements: int, device: torch.device) -> tuple[int, str]:
        if n == 0:
            return 0, "no layer checkpointed"
        if self.keep != "auto":
            return min(n, int(self.keep)), f"keep_activations={self.keep}"
        if _several_processes():
            return 0, "several processes: gradient memory is not what this process's gradients take"
        if _allocated_bytes(device) is None:
            return 0, f"the {device.type} allocator's memory cannot be read"
        if self.measured_elements == 0 or elements > self.measured_elements:
            return 0, "activation size not measured yet for this many tokens"
        # read now, not at conversion: PEFT or the user may freeze parameters later
        total, largest = 0, 0
        for layer in self.layers:
            params = [p for p in layer.parameters() if p.requires_grad]
            if any(p.grad is not None for p in params):
                return 0, "gradients exist at the forward's start (accumulation or a deferred update)"
            layer_bytes = sum(_nbytes(p) for p in params)
            total, largest = total + layer_bytes, max(largest, layer_bytes)
        per_layer = self.bytes_per_element * elements
        budget = total - largest
        if per_layer <= 0 or budget <= 0:
            return 0, "no gradient memory to spare"
        k = min(n, math.floor(budget / per_layer))
        return (
            k,
            f"{k} layers' activations ({per_layer / 2**20:.0f} MiB each) fit in {budget / 2**20:.0f} MiB of gradients to come",
        )

    def observe(self, activation_bytes: int, elements: int) -> None:
        """A layer's activation bytes for an input of ``elements`` elements, as measured."""
        if elements <= 0 or activation_bytes <= 0:
            return
        self.bytes_per_element = max(self.bytes_per_element, activation_bytes / elements)
        self.measured_elements = max(self.measured_elements, elements)


class _SelectiveCheckpoint:
    """Stands in for a layer's ``_gradient_checkpointing_func``: runs the layer without a
    checkpoint where the plan keeps it, and measures its activations in the recompute otherwise."""

    def __init__(self, inner, layer: nn.Module, plan: RecomputePlan) -> None:
        self.inner = inner
        self._layer = layer  # a strong reference: the model stays picklable (torch.save(model))
        self._plan = plan

    def __call__(self, function, *args, **kwargs):
        plan, layer = self._plan, self._layer
        first = args[0] if args and torch.is_tensor(args[0]) else None
        if (
            first is None
            or in_backward()
            or not torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or (first.is_cuda and torch.cuda.is_current_stream_capturing())
        ):
            return self.inner(function, *args, **kwargs)
        if plan.kept is None:
            plan.decide(first.numel(), first.device)
        if id(layer) in plan.kept:
            before = _allocated_bytes(first.device)
            out = function(*args, **kwargs)
            if before is not None:
                plan.observe(_allocated_bytes(first.device) - before - _tensor_bytes(out), first.numel())
            return out
        return self.inner(_measured(function, plan, first.numel(), first.device), *args, **kwargs)


def _measured(function, plan: RecomputePlan, elements: int, device: torch.device):
    """``function``, measuring what it leaves allocated when autograd recomputes it."""

    def run(*args, **kwargs):
        if not in_backward():
            return function(*args, **kwargs)
        before = _allocated_bytes(device)
        out = None
        try:
            out = function(*args, **kwargs)
            return out
        finally:  # non-reentrant recomputes stop early (an exception) once every saved tensor is back
            if before is not None:
                plan.observe(_allocated_bytes(device) - before - _tensor_bytes(out), elements)

    return run


def _plan_forward(stack: nn.Module, args, kwargs) -> None:
    """Forward pre-hook of the decoder stack: a new decision for this forward, and every
    checkpointed layer's checkpoint function wrapped (transformers sets it when checkpointing is
    enabled, before or after conversion)."""
    plan: RecomputePlan = stack.__dict__[_PLAN]
    plan.kept = None
    if not (stack.training and torch.is_grad_enabled()):
        return
    for layer in plan.layers:
        func = layer.__dict__.get("_gradient_checkpointing_func")
        if func is not None and not isinstance(func, _SelectiveCheckpoint):
            layer._gradient_checkpointing_func = _SelectiveCheckpoint(func, layer, plan)


def install_selective_recompute(model: nn.Module, keep: str | int = "auto") -> int:
    """Give each decoder stack of ``model`` (a family in the table) a :class:`RecomputePlan`;
    returns the number of stacks. Idempotent (a second call updates ``keep``)."""
    from hf_fp8.integrations.families import family_of

    family = family_of(model)
    if family is None:
        return 0
    stacks = 0
    for module in model.modules():
        for child in module.children():
            if (
                isinstance(child, nn.ModuleList)
                and len(child)
                and all(type(m).__name__ == family.decoder for m in child)
            ):
                plan = module.__dict__.get(_PLAN)
                if plan is None:
                    module.__dict__[_PLAN] = RecomputePlan(list(child), keep)
                    module.__dict__[_HOOK] = module.register_forward_pre_hook(_plan_forward, with_kwargs=True)
                else:
                    plan.keep = keep
                stacks += 1
    return stacks


def remove_selective_recompute(model: nn.Module) -> None:
    """Undo :func:`install_selective_recompute` (transformers' checkpointing again)."""
    for module in model.modules():
        module.__dict__.pop(_PLAN, None)
        hook = module.__dict__.pop(_HOOK, None)
        if hook is not None:
            hook.remove()
        func = module.__dict__.get("_gradient_checkpointing_func")
        if isinstance(func, _SelectiveCheckpoint):
            module._gradient_checkpointing_func = func.inner


def recompute_plans(model: nn.Module) -> list[RecomputePlan]:
    """The plans of ``model``'s decoder stacks (empty if none is installed)."""
    return [m.__dict__[_PLAN] for m in model.modules() if _PLAN in m.__dict__]
