"""Delayed scaling's scale updates for a whole model in one launch per forward.

Each delayed-scaling cast first turns its amax history into a scale and rolls the history (one
tiny kernel), then casts. In a model that is one extra launch per cast: 3 per FP8 layer per
step, 72 for the 24 MLP layers of an 8-layer Llama-3-8B, each ~30 us of host time on the lent
H100's host (``benchmarks/results/history/host_h100.json``) for ~2 us of GPU work. TransformerEngine
updates every scale in one fused kernel per step for the same reason.

:class:`DelayedScaleUpdateHook`, a forward pre-hook that :func:`hf_fp8.convert` registers on the
model it converts, does the update of every layer's every seeded slot in one launch per
(history length, format) when the model's forward starts, and marks each slot *pending*; the
slot's next cast consumes the mark instead of launching its own update. Nothing touches a
history between that update and the cast that consumes it (only casts of that slot record
into it), so the numbers are exactly those of per-cast updates: the same update, done
earlier. Forwards without grad update nothing (they change no scaling state); a slot still pending
from an earlier forward (a gradient slot after a forward with grad but no backward; its
history then shows the update before the cast that uses it) is not updated again; slots not yet seeded are left to their first cast;
casts that are not the first of their slot since the update (an activation-checkpoint
recompute) update themselves, as before. Under ``torch.compile`` the hook does nothing and
each cast updates its own scale.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_fp8 import quantize as Q
from hf_fp8._backend import use_triton_kernels
from hf_fp8.config import AmaxComputeAlgo
from hf_fp8.scaling import Role

__all__ = [
    "DelayedScaleUpdateHook",
    "in_backward",
    "install_delayed_update_hook",
    "remove_delayed_update_hook",
    "training_forward",
]

# Whether the forward of a model carrying the update hook started with grad enabled, until it
# ends: the first pass of a reentrant activation checkpoint runs its layers without grad inside
# such a training forward, and its casts must still advance the delayed state (once).
_ROOT_TRAINING = [False]


def in_backward() -> bool:
    """True while autograd runs a backward pass: a forward then is activation checkpointing
    recomputing a layer (reentrant or not). torch has no public query for this; without
    ``torch._C._current_graph_task_id`` (every torch hf_fp8 supports has it) this says False and
    a recompute updates its scales again, as it did before."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def training_forward() -> bool:
    """Whether the FP8 casts called now advance the delayed-scaling state: a forward with grad, or
    the first pass of a reentrant checkpoint inside a training forward; not a recompute (it casts
    with the scales its first pass used), not evaluation or generation."""
    return (torch.is_grad_enabled() or _ROOT_TRAINING[0]) and not in_backward()


class DelayedScaleUpdateHook:
    """Forward pre-hook: update every delayed-scaling layer's scales under ``module`` at once.

    It runs at the start of every forward, while the GPU waits for the step's first kernels,
    so its host time is step time: it took 1.0-1.8 ms per step on the lent H100's host for an
    8-layer Llama-3-8B (56 layers, 168 slots) when it walked the module tree and checked every
    entry each time. The layers with delayed state are found once (again only after a new
    :class:`~hf_fp8.scaling.DelayedScalingState` was built anywhere, i.e. a conversion, or a
    cached layer's state was replaced), and the entries are checked once, when their device
    address table is built. When the same entries are due as in the last forward (every
    training forward after the first), that table is reused without reading any address, until
    a buffer is replaced (``DelayedScalingState.buffers_replaced``).
    """

    def __init__(self) -> None:
        # device address tables per set of entries (rebuilt when any buffer moves): building one
        # costs a host-to-device copy, so the steady state reuses it
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # per group key, the last table used: (DelayedScalingState.buffers_replaced then, its entries, the table)
        self._last_tables: dict[tuple, tuple[int, list, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self._groups: dict[tuple, list[tuple[object, int]]] = {}  # per group key, its (state, slot) entries
        # per (layer, slot) of the last walk, three per layer: (layer, state, slot, group key)
        self._slots: list[tuple[nn.Module, object, int, tuple]] = []
        self._walked: tuple[int, int] | None = None  # (id of the module walked, states created then)

    def _delayed_slots(self, module: nn.Module) -> list[tuple[nn.Module, object, int, tuple]]:
        """Every (layer, state, slot, group key) under ``module``; the walk and the keys (the
        history's device and shape, the slot's format and the config's amax algorithm and
        margin) are redone only when a state was built or replaced since the last walk."""
        from hf_fp8.scaling import DelayedScalingState

        stamp = (id(module), DelayedScalingState.created)
        if stamp != self._walked or any(getattr(m, "_fp8_delayed", None) is not st for m, st, _, _ in self._slots[::3]):
            self._slots = []
            for m in module.modules():
                state = getattr(m, "_fp8_delayed", None)
                if state is None:
                    continue
                cfg = m.fp8_config  # frozen: the key stays valid while the layer keeps this state
                use_max = cfg.amax_compute_algo is AmaxComputeAlgo.MAX
                shape = tuple(state.history.shape)
                for slot in range(3):
                    fmt = cfg.grad_format if slot == Role.GRAD_OUTPUT else cfg.forward_format
                    key = (state.history.device, shape, fmt.dtype, use_max, cfg.margin)
                    self._slots.append((m, state, slot, key))
            self._groups = {}
            for _, state, slot, key in self._slots:
                self._groups.setdefault(key, []).append((state, slot))
            self._last_tables = {}
            self._walked = stamp
        return self._slots

    def __call__(self, module: nn.Module, args) -> None:
        if torch.compiler.is_compiling():
            return None
        _ROOT_TRAINING[0] = torch.is_grad_enabled() and not in_backward()

        # a forward without grad (evaluation, generation) casts with the scales as they are and
        # changes nothing (hf_fp8.scaling.quantize_operand(training=False))
        if not torch.is_grad_enabled():
            return None
        self._delayed_slots(module)
        for key, entries in self._groups.items():
            due = [(st, sl) for st, sl in entries if st.seeded[sl] and not st.pending[sl]]
            if not due:
                continue
            _, _, dtype, use_max, margin = key
            histories = [st.history for st, _ in due]
            scales = [st.scale for st, _ in due]
            slots = [sl for _, sl in due]
            addresses = None
            if use_triton_kernels(histories[0]):
                addresses = self._addresses(key, due, histories, scales, slots)
            Q.delayed_scale_update_many(
                histories, scales, slots, dtype, use_max=use_max, margin=margin, addresses=addresses
            )
            for st, sl in due:
                st.pending[sl] = True
        return None

    def _addresses(self, key, due, histories, scales, slots):
        """The device address table of ``due`` (built once per set of entries and buffers). The
        group's last one is reused while its entries are the same (list equality: identity of
        the states, the same slots) and no buffer was replaced since, without reading any address."""
        from hf_fp8.kernels.quant import delayed_update_addresses
        from hf_fp8.scaling import DelayedScalingState

        last = self._last_tables.get(key)
        if last is not None and last[0] == DelayedScalingState.buffers_replaced and last[1] == due:
            return last[2]
        table_key = tuple((h.data_ptr(), sc.data_ptr(), sl) for h, sc, sl in zip(histories, scales, slots))
        addresses = self._tables.get(table_key)
        if addresses is None:
            if len(self._tables) >= 16:
                self._tables.clear()
            addresses = self._tables[table_key] = delayed_update_addresses(histories, scales, slots)
        self._last_tables[key] = (DelayedScalingState.buffers_replaced, due, addresses)
        return addresses


def _end_of_forward(module: nn.Module, args, output) -> None:
    _ROOT_TRAINING[0] = False


def install_delayed_update_hook(model: nn.Module) -> bool:
    """Register the hook on ``model`` (idempotent); True if it was added."""
    if any(isinstance(h, DelayedScaleUpdateHook) for h in model._forward_pre_hooks.values()):
        return False
    model.register_forward_pre_hook(DelayedScaleUpdateHook())
    model.register_forward_hook(_end_of_forward)
    return True


def remove_delayed_update_hook(model: nn.Module) -> None:
    for key, h in list(model._forward_pre_hooks.items()):
        if isinstance(h, DelayedScaleUpdateHook):
            del model._forward_pre_hooks[key]
    for key, h in list(model._forward_hooks.items()):
        if h is _end_of_forward:
            del model._forward_hooks[key]
