"""Agreeing on FP8 scales across data-parallel ranks.

Which scales need agreement:

- Weights. Under DDP every rank holds the same weight, so its amax is the same everywhere.
  Under FSDP2 (``fully_shard``) the module's forward runs on the all-gathered (unsharded)
  weight, so dynamic tensorwise and rowwise scales are computed on the full tensor, never on a
  local shard; nothing to do.
- Activations and output gradients differ per rank (each rank has its own micro-batch).
  Dynamic recipes scale each rank's tensor by its own amax, which is exact for that tensor.
  The delayed recipe derives scales from an amax *history*: if every rank kept its own, ranks
  would quantize the same layer with different scales and the histories would drift apart
  (torchtitan #3109: NaNs with amax reduced on local shards only). :func:`sync_amax_histories`
  takes the maximum of the newest amax row across ranks, for every delayed layer of the model
  at once (one all-reduce of 3 floats per layer), so all ranks share one history and one scale.

Call it once per optimizer step, after the backward (the newest row then holds the input,
weight and output-gradient amaxes of the step) and before the next forward, where the scales
are derived. :func:`attach_amax_sync` does that with an optimizer step pre-hook;
``hf_fp8.Accelerator`` and ``hf_fp8.Trainer`` attach it for you when the recipe is delayed
and more than one process runs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from hf_fp8.linear import Fp8Linear

__all__ = [
    "delayed_layers",
    "sync_amax_histories",
    "attach_amax_sync",
    "world_size",
    "full_state_dict",
    "save_pretrained_consolidated",
    "save_fp8_consolidated",
    "save_sharded",
    "load_sharded",
]

_FP8_STATE_SUFFIXES = (".fp8_amax_history", ".fp8_scale")


def world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def delayed_layers(model: nn.Module) -> list[Fp8Linear]:
    """The model's Fp8Linear layers that keep an amax history (delayed recipe), in a fixed order."""
    return [m for m in model.modules() if isinstance(m, Fp8Linear) and m._fp8_delayed is not None]


@torch.no_grad()
def sync_amax_histories(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """All-reduce (max) the newest amax row of every delayed layer across ``group``; returns
    how many layers were synced (0 without an initialized process group of more than one rank).

    One collective for the whole model: the rows are packed into one FP32 buffer. Every rank
    must call it at the same point with the same model structure, as for any collective.
    """
    layers = delayed_layers(model)
    if not layers or world_size(group) == 1:
        return 0
    rows = torch.stack([m.fp8_amax_history[0] for m in layers])  # (n_layers, 3)
    dist.all_reduce(rows, op=dist.ReduceOp.MAX, group=group)
    measured = (rows > 0).tolist()  # one device-to-host copy for all layers
    for m, row, seen in zip(layers, rows, measured):
        m.fp8_amax_history[0].copy_(row)
        # a column another rank has measured counts as seeded here too
        m._fp8_delayed.seeded = [a or b for a, b in zip(m._fp8_delayed.seeded, seen)]
    return len(layers)


def attach_amax_sync(optimizer: torch.optim.Optimizer, model: nn.Module, group: dist.ProcessGroup | None = None):
    """Run :func:`sync_amax_histories` before every ``optimizer.step()``; returns the hook handle
    (``handle.remove()`` detaches it). A no-op handle-free return (None) when there is nothing
    to sync: no delayed layers or a single process."""
    if not delayed_layers(model) or world_size(group) == 1:
        return None
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps optimizers

    def hook(opt, args, kwargs) -> None:  # a step pre-hook must return None (or new arguments)
        sync_amax_histories(model, group)

    return inner.register_step_pre_hook(hook)


# ---- checkpoints of sharded (FSDP2) or replicated (DDP) models -------------------------------
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on CPU, on rank 0 (an empty dict elsewhere).

    A collective under FSDP2: every rank must call it. Works the same on unsharded models.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if world_size() == 1:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _rank0() -> bool:
    return world_size() == 1 or dist.get_rank() == 0


def save_pretrained_consolidated(model: nn.Module, directory: str) -> None:
    """``save_pretrained`` of a sharded or replicated HF model: one stock checkpoint (no hf_fp8
    keys, original dtype) written by rank 0; every rank must call it."""
    state = {k: v for k, v in full_state_dict(model).items() if not k.endswith(_FP8_STATE_SUFFIXES)}
    if _rank0():
        model.save_pretrained(directory, state_dict=state)
    if world_size() > 1:
        dist.barrier()


def save_fp8_consolidated(model: nn.Module, directory: str, **kwargs) -> None:
    """:func:`hf_fp8.save_fp8` of a sharded or replicated model, written by rank 0; every rank must call it."""
    from hf_fp8.integrations.export import save_fp8

    state = full_state_dict(model)
    if _rank0():
        save_fp8(model, directory, state_dict=state, **kwargs)
    if world_size() > 1:
        dist.barrier()


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Each rank writes its shards of the model and optimizer (torch.distributed.checkpoint),
    FP8 state included (the delayed recipe's histories are identical on every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Restore :func:`save_sharded`'s checkpoint into a model sharded the same way (same world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=directory)
    # goes through each Fp8Linear's _load_from_state_dict, which re-seeds the delayed scales
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
