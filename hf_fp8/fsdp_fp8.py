"""FSDP2 all-gathers FP8 weights: one byte per weight on the wire instead of two.

Without this, ``fully_shard`` all-gathers each FP8 layer's BF16 (or FP32) weight and
:class:`~hf_fp8.Fp8Linear` casts the gathered weight to E4M3. With it, each rank casts its own
shard to E4M3 *before* the gather, with a scale every rank shares, and the layer multiplies the
gathered codes directly: the same codes the cast of the gathered weight would give, so training
is the same bit for bit (``tests/test_distributed.py``), at half the gather traffic.

The shared scale, per recipe:

- tensorwise: ``448 / amax`` of the whole weight, the amax all-reduced (MAX) over the shard
  group: one 4-byte collective per layer and gather;
- delayed: the layer's delayed weight scale, which every rank already shares (its amax history
  is synced each step, :func:`hf_fp8.distributed.sync_amax_histories`); the shard's amax is
  recorded into the history, and the sync's MAX makes it the whole weight's. Its first cast
  measures the whole weight's amax as tensorwise does, and seeds the history with it.

The backward's re-gather (and an activation checkpoint's recompute) casts with the scale the
forward used. Rowwise and blockwise scale along the weight's rows *and* columns (the transposed
copy the input gradient needs has other scales), which codes gathered once cannot give: those
layers keep the BF16 gather, with a warning.

How: the weight's data becomes a tensor subclass (:class:`Fp8GatherWeight`) that FSDP2 shards
like any tensor and asks, through its all-gather extension hooks (``fsdp_pre_all_gather`` /
``fsdp_post_all_gather``), for what to gather; the unsharded parameter is an
:class:`Fp8GatheredWeight` (the codes and the scale, presenting the weight's dtype to autograd, so
its gradient is an ordinary BF16/FP32 tensor that FSDP2 reduce-scatters as usual).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import nn

from hf_fp8.config import Recipe
from hf_fp8.delayed import in_backward, training_forward
from hf_fp8.linear import Fp8Linear
from hf_fp8.scaling import Role

__all__ = ["Fp8GatherWeight", "Fp8GatheredWeight", "enable_fp8_all_gather", "fp8_all_gather_layers"]

_E4M3 = torch.float8_e4m3fn
_aten = torch.ops.aten
# ops whose result is still "the weight" (or a shard or copy of it) while FSDP2 shards it, moves
# it, or the optimizer copies it: the result stays an Fp8GatherWeight
_KEEP_WRAPPED = {
    _aten.detach.default,
    _aten.alias.default,
    _aten.view.default,
    _aten.as_strided.default,
    _aten.slice.Tensor,
    _aten.split.Tensor,
    _aten.split_with_sizes.default,
    _aten.clone.default,
    _aten.copy_.default,
    _aten._to_copy.default,
    _aten.empty_like.default,
    _aten.new_zeros.default,
    _aten.new_empty.default,
    _aten._pin_memory.default,
}


class Fp8GatherWeight(torch.Tensor):
    """An FP8 layer's high-precision weight (a shard of it under FSDP2) that FSDP2 all-gathers as
    E4M3 codes: every other op sees the plain tensor."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, layer: Fp8Linear):
        t = torch.Tensor._make_wrapper_subclass(
            cls, data.size(), strides=data.stride(), storage_offset=data.storage_offset(), dtype=data.dtype,
            device=data.device, layout=data.layout, requires_grad=data.requires_grad,
        )  # fmt: skip
        t._data, t._layer = data, layer
        return t

    def __init__(self, data: torch.Tensor, layer: Fp8Linear) -> None:
        pass

    def __repr__(self) -> str:
        return f"Fp8GatherWeight({self._data!r})"

    def __reduce_ex__(self, protocol):
        # checkpoints (torch.save, torch.distributed.checkpoint) hold the plain weight, not the layer
        return self._data.__reduce_ex__(protocol)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        layer = None

        def unwrap(t):
            nonlocal layer
            layer = layer or t._layer
            return t._data

        args, kwargs = pytree.tree_map_only(cls, unwrap, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in _KEEP_WRAPPED:
            return out
        return pytree.tree_map_only(torch.Tensor, lambda t: cls(t, layer), out)

    def __tensor_flatten__(self):
        return ["_data"], self._layer

    @staticmethod
    def __tensor_unflatten__(inner, layer, outer_size, outer_stride):
        return Fp8GatherWeight(inner["_data"], layer)

    # ---- FSDP2's all-gather extension ------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size=None, outer_stride=None, module=None, mp_policy=None):
        codes, scale_inv = _cast_shard(self._layer, self._data, mesh.get_group() if mesh is not None else None)
        return (codes,), (scale_inv,)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (codes,), (scale_inv,) = all_gather_outputs, metadata
        if out is not None:  # a later gather: FSDP2 refilled the codes' storage in place
            out._scale_inv.copy_(scale_inv)
            return None
        gathered = Fp8GatheredWeight(codes, scale_inv.clone(), param_dtype)
        return gathered, (codes,)


class Fp8GatheredWeight(torch.Tensor):
    """The unsharded weight as gathered: E4M3 codes and their FP32 ``scale_inv``, presented to
    autograd with the weight's dtype. :class:`~hf_fp8.Fp8Linear` multiplies the codes directly;
    any other op sees the dequantized weight."""

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype):
        t = torch.Tensor._make_wrapper_subclass(
            cls, codes.size(), strides=codes.stride(), storage_offset=codes.storage_offset(), dtype=dtype,
            device=codes.device, requires_grad=False,
        )  # fmt: skip
        t._codes, t._scale_inv = codes, scale_inv
        return t

    def __init__(self, codes, scale_inv, dtype) -> None:
        pass

    def __repr__(self) -> str:
        return (
            f"Fp8GatheredWeight(shape={tuple(self.shape)}, dtype={self.dtype}, scale_inv={self._scale_inv.item():.3g})"
        )

    __torch_function__ = torch._C._disabled_torch_function_impl

    def dequantize(self) -> torch.Tensor:
        return (self._codes.float() * self._scale_inv).to(self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in (_aten.as_strided.default, _aten.view.default, _aten.detach.default, _aten.alias.default):
            self, *rest = args
            return cls(func(self._codes, *rest, **(kwargs or {})), self._scale_inv, self.dtype)
        args, kwargs = pytree.tree_map_only(cls, lambda t: t.dequantize(), (args, kwargs or {}))
        return func(*args, **kwargs)

    def __tensor_flatten__(self):
        return ["_codes", "_scale_inv"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner, dtype, outer_size, outer_stride):
        return Fp8GatheredWeight(inner["_codes"], inner["_scale_inv"], dtype)


@torch.no_grad()
def _cast_shard(layer: Fp8Linear, shard: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 codes of ``shard``, FP32 ``scale_inv``) with the scale every rank of ``group`` shares."""
    from hf_fp8 import quantize as Q

    cfg, delayed, slot = layer.fp8_config, layer._fp8_delayed, int(Role.WEIGHT)
    fmax = 448.0
    training = training_forward()
    local_amax = None
    kept = layer.__dict__.get("_fp8_gather_scale")
    if in_backward() and kept is not None:  # the backward's re-gather, a recompute: the forward's scale
        scale = kept
    elif cfg.recipe is Recipe.DELAYED and delayed is not None and delayed.seeded[slot]:
        if training:
            delayed.update_before_cast(slot, cfg, _E4M3)
        scale = delayed.scale[slot].clone()
        local_amax = shard.float().abs().amax() if training else None
    else:  # tensorwise, or the delayed recipe's first cast: the whole weight's amax, now
        amax = shard.float().abs().amax()
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        scale = Q.amax_to_scale(amax, fmax)
        if delayed is not None and training:
            delayed.seed(slot, amax, cfg, fmax)
    q = Q.quantize_with_scale(shard.reshape(shard.shape[0], -1), _E4M3, scale, write_y=True, write_t=False)
    if local_amax is not None:  # recorded as the unsharded cast records it; the per-step sync takes the MAX
        amax_slot = delayed.slot_views(slot)[1]
        amax_slot.copy_(torch.maximum(amax_slot, local_amax))
    layer.__dict__["_fp8_gather_scale"] = scale
    return q.data.view(shard.shape), q.scale_inv.reshape(())


def enable_fp8_all_gather(model: nn.Module) -> int:
    """Make FSDP2 gather ``model``'s FP8 layers' weights in FP8; call it after :func:`hf_fp8.convert`
    and before ``fully_shard``. Returns the number of layers. Tensorwise and delayed layers take
    part; rowwise, blockwise and FP8-only (frozen) weights keep their gather, with one warning."""
    done, left = 0, []
    for name, m in model.named_modules():
        if not isinstance(m, Fp8Linear):
            continue
        if isinstance(m.weight.data, Fp8GatherWeight):  # enabled already
            done += 1
            continue
        if not m.fp8_config.recipe.per_tensor or m.has_fp8_weight:
            left.append(name)
            continue
        m.weight = nn.Parameter(Fp8GatherWeight(m.weight.data, m), requires_grad=m.weight.requires_grad)
        done += 1
    if left:
        warnings.warn(
            f"enable_fp8_all_gather: {len(left)} FP8 layers (e.g. {left[0]}) keep the high-precision all-gather: "
            "rowwise and blockwise scales depend on the axis each GEMM reads, and FP8-only weights are gathered "
            "as they are stored",
            UserWarning,
            stacklevel=2,
        )
    return done


def fp8_all_gather_layers(model: nn.Module) -> list[str]:
    """Names of the layers whose weights FSDP2 gathers in FP8."""
    return [n for n, m in model.named_modules() if isinstance(m, Fp8Linear) and _is_gather_weight(m.weight)]


def _is_gather_weight(w) -> bool:
    local = getattr(w, "_local_tensor", w)
    return isinstance(local, Fp8GatherWeight) or isinstance(getattr(w, "data", None), Fp8GatherWeight)
