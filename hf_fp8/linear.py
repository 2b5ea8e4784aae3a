"""``Fp8Linear``: an ``nn.Linear`` whose three GEMMs run in FP8.

Forward ``Y = X Wᵀ``, input gradient ``dX = dY W`` and weight gradient ``dW = dYᵀ X`` are
each one ``_scaled_mm`` on FP8 operands (or its exact emulation off Hopper/Ada). The
module is an ``nn.Linear`` subclass sharing the original ``Parameter`` objects, so
optimizers, PEFT and ``isinstance`` checks keep working; only ``forward`` changes.

What is saved for backward is FP8 (Xᵀ and Wᵀ, one byte per element; Wᵀ re-cast in the
backward instead with ``Fp8Config(save_weight_transpose=False)``) instead of the BF16 input,
and nothing is quantized that no gradient needs: a frozen weight skips Xᵀ and the
weight-gradient GEMM; an input that needs no gradient skips Wᵀ and the input-gradient GEMM.
The autograd (eager ``autograd.Function`` and the custom ops ``torch.compile`` sees) lives in
:mod:`hf_fp8.linear_ops`; :func:`shared_input_linears` runs several layers reading one input
as one node.

With ``Fp8Config(fp8_weights=True)`` a frozen layer keeps its weight in FP8 only (see
:meth:`Fp8Linear.store_weight_in_fp8`): the forward GEMM reads it as is, and the
input-gradient GEMM reads its transpose, so no weight is quantized during training.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_fp8.config import Fp8Config, Recipe
from hf_fp8.linear_ops import NonFiniteError, apply_group, is_fp8_dtype, register_module
from hf_fp8.scaling import DelayedScalingState, Role

__all__ = ["Fp8Linear", "NonFiniteError", "is_fp8_dtype", "shared_input_linears"]


class Fp8Linear(nn.Linear):
    """``nn.Linear`` computing its forward and both backward GEMMs in FP8.

    Build it with :meth:`from_linear` (or let :func:`hf_fp8.convert` do it); the constructor
    takes ``nn.Linear``'s arguments plus ``config``.

    Args:
        config (`Fp8Config`, *optional*): the recipe; defaults to ``Fp8Config()`` (delayed).

    Buffers:
        ``fp8_nonfinite`` (int32, 3, not saved): sticky flags set when the input, weight or
        output gradient contained inf/NaN (see :func:`hf_fp8.nonfinite_modules`).
        Delayed recipe only, saved in ``state_dict``: ``fp8_amax_history`` (L, 3) with row 0 the
        most recent amax, and ``fp8_scale`` (3,), for input, weight, grad_output.

    Input and output: ``(*, in_features) -> (*, out_features)`` in the input's dtype, or in
    the autocast dtype inside ``torch.autocast``. Parameters may be FP32 or BF16; they are
    quantized directly from their own dtype. ``in_features`` and ``out_features`` must be
    multiples of 16 (the FP8 GEMM's rule).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        config: Fp8Config | None = None,
    ) -> None:
        if in_features % 16 or out_features % 16:
            raise ValueError(
                f"Fp8Linear: in_features={in_features} and out_features={out_features} must both be multiples of 16 "
                "(torch._scaled_mm's rule); keep this layer as nn.Linear (hf_fp8.convert does so automatically)"
            )
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if config is not None and not isinstance(config, Fp8Config):
            raise TypeError(f"Fp8Linear: config must be an Fp8Config, got {type(config).__name__}")
        self.fp8_config = config or Fp8Config()
        if self.fp8_config.full_bf16:
            raise ValueError("Fp8Linear: config.recipe is None (full-BF16 mode), which uses no FP8 layers")
        self.fp8_name: str | None = None
        self._init_fp8_buffers(device)

    def _init_fp8_buffers(self, device: torch.device | str | None) -> None:
        register_module(self)
        self.register_buffer("fp8_nonfinite", torch.zeros(3, dtype=torch.int32, device=device), persistent=False)
        self._fp8_delayed: DelayedScalingState | None = None
        # set only while hf_fp8.linear._one_by_one runs this layer as a member of an input-sharing
        # group: the shared input is cast with the group's first layer's delayed state
        self._fp8_input_from = None
        if self.fp8_config.recipe is Recipe.DELAYED:
            L = self.fp8_config.amax_history_len
            self.register_buffer("fp8_amax_history", torch.zeros(L, 3, dtype=torch.float32, device=device))
            self.register_buffer("fp8_scale", torch.ones(3, dtype=torch.float32, device=device))
            self._fp8_delayed = DelayedScalingState(self.fp8_amax_history, self.fp8_scale)

    def __setstate__(self, state):  # copy.deepcopy and unpickling build modules without __init__
        super().__setstate__(state)
        register_module(self)

    def _fp8_buffers_on_meta(self) -> bool:
        return self.fp8_nonfinite.is_meta or (self._fp8_delayed is not None and self.fp8_amax_history.is_meta)

    def reset_fp8_state(self) -> None:
        """Fresh FP8 state: empty amax histories, unit scales, no non-finite flag; each slot's
        next cast measures its own amax again. Done by itself where the buffers come from
        uninitialized memory (``to_empty`` after building on the meta device)."""
        self._materialize_fp8_buffers()
        self.fp8_nonfinite.zero_()
        if self._fp8_delayed is not None:
            self.fp8_amax_history.zero_()
            self.fp8_scale.fill_(1.0)
            self._fp8_delayed.seed_from_history()

    def _materialize_fp8_buffers(self) -> None:
        """Fresh buffers, on the weight's device, in place of those still on the meta device."""
        device = self.weight.device
        if self.fp8_nonfinite.is_meta:
            self.fp8_nonfinite = torch.zeros(3, dtype=torch.int32, device=device)
        if self._fp8_delayed is not None:
            if self.fp8_amax_history.is_meta:
                L = self.fp8_config.amax_history_len
                self.fp8_amax_history = torch.zeros(L, 3, dtype=torch.float32, device=device)
            if self.fp8_scale.is_meta:
                self.fp8_scale = torch.ones(3, dtype=torch.float32, device=device)
            self._fp8_delayed.history = self.fp8_amax_history
            self._fp8_delayed.scale = self.fp8_scale
            self._fp8_delayed.seed_from_history()

    def _apply(self, fn, recurse=True):
        # built on the meta device: to_empty() gives the buffers uninitialized memory (garbage
        # histories, every layer flagged non-finite); they are reset once they are real
        from_meta = self._fp8_buffers_on_meta()
        # detach(): a new tensor on the same storage, which Module._apply's in-place
        # ``param.data = fn(param)`` does not touch
        fp8_weight = self.weight.detach() if self.has_fp8_weight else None
        out = super()._apply(fn, recurse)
        if fp8_weight is not None and self.weight.dtype != fp8_weight.dtype:
            # model.to(bfloat16) / .half() would turn FP8 codes into numbers without their scale:
            # keep the codes (moved to the new device) and take the new dtype as the compute dtype.
            self.compute_dtype = self.weight.dtype
            self.weight = nn.Parameter(fp8_weight.to(self.weight.device), requires_grad=False)
        # Scales and amax histories stay FP32 whatever model.to(bfloat16) / .half() does: a BF16
        # scale would change the quantization, and a BF16 amax history loses its precision.
        for name in ("fp8_amax_history", "fp8_scale", "fp8_weight_scale_inv"):
            buf = getattr(self, name, None)
            if buf is not None and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        # Buffers are replaced by .to()/.cuda(); keep the delayed state pointing at the live ones.
        if self._fp8_delayed is not None:
            self._fp8_delayed.history = self.fp8_amax_history
            self._fp8_delayed.scale = self.fp8_scale
        if from_meta and not self._fp8_buffers_on_meta():
            self.reset_fp8_state()
        return out

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        weight_key = prefix + "weight"
        incoming = state_dict.get(weight_key)
        fp8_load = self.has_fp8_weight and isinstance(incoming, torch.Tensor) and not is_fp8_dtype(incoming.dtype)
        if fp8_load:  # a high-precision checkpoint into an FP8-only weight: quantize it here
            state_dict = {k: v for k, v in state_dict.items() if k != weight_key}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if fp8_load:
            if tuple(incoming.shape) != tuple(self.weight.shape):
                error_msgs.append(
                    f"size mismatch for {weight_key}: copying a param with shape {tuple(incoming.shape)}, "
                    f"the shape in current model is {tuple(self.weight.shape)}."
                )
            else:
                self._load_fp8_weight_from(incoming)
            if weight_key in missing_keys:
                missing_keys.remove(weight_key)
        # A stock nn.Linear checkpoint has no FP8 state: loading it into a converted model is
        # fine, the layer measures its own amaxes from the first step.
        for name in ("fp8_amax_history", "fp8_scale"):
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)
        if self._fp8_buffers_on_meta() and not self.weight.is_meta:
            # load_state_dict(assign=True) into a model built on meta: the weights are real now,
            # the FP8 state (not in a stock checkpoint) must be too
            self._materialize_fp8_buffers()
        if self._fp8_delayed is not None:
            # load_state_dict(assign=True) hands the module new buffers: the state must use them
            if self._fp8_delayed.history is not self.fp8_amax_history:
                self._fp8_delayed.history = self.fp8_amax_history
            if self._fp8_delayed.scale is not self.fp8_scale:
                self._fp8_delayed.scale = self.fp8_scale
            if prefix + "fp8_amax_history" in state_dict:
                self._fp8_delayed.seed_from_history()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.has_fp8_weight:
            # A stock checkpoint: the weight dequantized to the dtype it had before conversion.
            destination[prefix + "weight"] = self.dense_weight()
        saved = destination.get(prefix + "weight")
        inner = getattr(saved, "_data", None)
        if inner is not None and type(saved).__name__ == "Fp8GatherWeight":
            # FSDP2's FP8 all-gather wrapper (hf_fp8.fsdp_fp8): checkpoints hold the plain weight
            destination[prefix + "weight"] = inner if keep_vars is False else saved

    # ---- FP8-only weights (Fp8Config(fp8_weights=True)) ----------------------------------------
    @property
    def has_fp8_weight(self) -> bool:
        """Whether ``weight`` holds FP8 codes only (scaled by ``fp8_weight_scale_inv``), frozen."""
        return is_fp8_dtype(self.weight.dtype)

    @torch.no_grad()
    def store_weight_in_fp8(self) -> None:
        """Replace the weight by its FP8 (E4M3) codes and one FP32 scale, frozen; idempotent.

        Halves (BF16) or quarters (FP32) the weight's memory. The FP8 codes are exactly what
        the tensorwise recipe would compute from the weight at every step, so a frozen layer's
        numerics do not change. The new ``weight`` is a new ``Parameter`` with
        ``requires_grad=False``: build the optimizer afterwards (frozen weights have no place
        in it anyway). ``compute_dtype`` keeps the original dtype: it is what
        :meth:`dense_weight`, ``state_dict()`` and PEFT's adapters use.
        """
        if self.has_fp8_weight:
            return
        if self.fp8_config.recipe is Recipe.ROWWISE:
            raise ValueError(f"{self.fp8_name or 'Fp8Linear'}: FP8-only weights need a per-tensor recipe, not rowwise")
        from hf_fp8 import quantize as Q

        w = self.weight
        q = Q.quantize_tensorwise(
            w.detach(), torch.float8_e4m3fn, write_y=True, write_t=False, nonfinite_flag=self.fp8_nonfinite[1:2]
        )
        self.compute_dtype = w.dtype
        self.register_buffer("fp8_weight_scale_inv", q.scale_inv.float().reshape(()).clone(), persistent=False)
        self.weight = nn.Parameter(q.data, requires_grad=False)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in high precision (``dtype``, default the original one): dequantized FP8
        codes for FP8-only weights, else the weight itself (detached)."""
        if not self.has_fp8_weight:
            w = self.weight.detach()
            return w if dtype is None else w.to(dtype)
        dense = self.weight.to(torch.float32) * self.fp8_weight_scale_inv
        return dense.to(dtype or self.compute_dtype)

    @torch.no_grad()
    def _load_fp8_weight_from(self, weight: torch.Tensor) -> None:
        weight = weight.to(self.weight.device)
        if torch.equal(weight, self.dense_weight(weight.dtype)):
            return  # what state_dict() wrote from these very codes: keep them bit for bit
        from hf_fp8 import quantize as Q

        q = Q.quantize_tensorwise(
            weight, torch.float8_e4m3fn, write_y=True, write_t=False, nonfinite_flag=self.fp8_nonfinite[1:2]
        )
        self.weight.copy_(q.data)
        self.fp8_weight_scale_inv.copy_(q.scale_inv.reshape(()))

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Fp8Config | None = None) -> Fp8Linear:
        """Wrap ``linear``'s own ``weight`` and ``bias`` Parameters (no copy) in an ``Fp8Linear``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Fp8Linear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, config=config)
        new.weight = linear.weight
        new.bias = linear.bias
        new._init_fp8_buffers(linear.weight.device)
        new.train(linear.training)
        _copy_hooks(linear, new)
        return new

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this module's ``weight`` and ``bias`` Parameters (no copy;
        an FP8-only weight comes back dequantized to its original dtype, still frozen)."""
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(self.dense_weight(), requires_grad=False) if self.has_fp8_weight else self.weight
        linear.bias = self.bias
        linear.train(self.training)
        _copy_hooks(self, linear)
        return linear

    def _check_input(self, x: torch.Tensor) -> None:
        if not x.is_floating_point():
            raise TypeError(f"{self.fp8_name or 'Fp8Linear'}: expected a floating-point input, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.fp8_name or 'Fp8Linear'}: input has {x.shape[-1]} features in its last dimension, "
                f"expected in_features={self.in_features} (shape {tuple(x.shape)})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return apply_group((self,), x)[0]

    def extra_repr(self) -> str:
        fp8_weight = ", weight=fp8(frozen)" if self.has_fp8_weight else ""
        return f"{super().extra_repr()}, fp8={self.fp8_config.short_str()}{fp8_weight}"


def _has_hooks(m: nn.Module) -> bool:
    return any(
        getattr(m, attr, None)
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def shared_input_linears(modules: tuple[nn.Module, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tuple(m(x) for m in modules)``, with ``x`` quantized once when that gives the same result.

    Layers that read the same input (gate and up projections; q, k and v) each quantize it
    and save its FP8 transposed copy for backward. When every module is an :class:`Fp8Linear`
    with one config and no hooks, they run as one autograd node: one cast of ``x``, one saved
    copy (measured: one fewer 8192x4096 cast and 32 MB less per Llama-3-8B MLP at B=2, S=4096).
    The numbers are those of separate calls for tensorwise and rowwise (the input's scale
    depends only on ``x``); for delayed scaling the group uses the first layer's input
    history, whose amaxes are the same ``x``'s. Anything else (PEFT wrappers, hooks, global
    hooks, BF16 layers) runs the modules one by one.
    """
    first = modules[0]
    shareable = (
        len(modules) > 1
        and all(type(m) is Fp8Linear and not _has_hooks(m) for m in modules)
        and all(m.fp8_config == first.fp8_config for m in modules)
        and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
    )
    if not shareable:
        return _one_by_one(modules, x)
    for m in modules:
        m._check_input(x)
    return apply_group(tuple(modules), x)


_UNSEEDED = object()  # the group's input slot had no history yet: the members cast tensorwise, as the group does


def _one_by_one(modules: tuple[nn.Module, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tuple(m(x) for m in modules)`` (their hooks run), with delayed-scaling layers casting the
    shared input as the group would: with the first layer's input scale. Otherwise a hook that
    comes and goes (the FP8 monitor samples every N steps) would switch the other layers between
    the group's input history and their own, and change the numbers."""
    first = modules[0]
    delayed = (
        len(modules) > 1
        and not torch.compiler.is_compiling()
        and all(type(m) is Fp8Linear and m.fp8_config == first.fp8_config for m in modules)
        and first._fp8_delayed is not None
        and not is_fp8_dtype(x.dtype)
    )
    if not delayed:
        return tuple(m(x) for m in modules)
    state = first._fp8_delayed
    seeded = state.seeded[Role.INPUT]
    out = [first(x)]
    source = state if seeded else _UNSEEDED
    for m in modules[1:]:
        m._fp8_input_from = source
        try:
            out.append(m(x))
        finally:
            m._fp8_input_from = None
    return tuple(out)


def linear_on_kept_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for an ``x`` that stays alive until the backward anyway (an attention output,
    which the attention's backward keeps): a plain :class:`Fp8Linear` then keeps a reference
    to ``x`` instead of its FP8 transposed copy, and its backward re-casts that copy with the
    forward's scale (the same codes). One byte per input element less between forward and
    backward: 33.5 MB per Llama-3-8B ``o_proj`` at B=2, S=4096, for one cast in the backward.
    Anything else (other modules, hooks, ``torch.compile``) runs ``module(x)``.
    """
    if (
        type(module) is not Fp8Linear
        or _has_hooks(module)
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
        or torch.compiler.is_compiling()
    ):
        return module(x)
    module._check_input(x)
    return apply_group((module,), x, recast_input=True)[0]


def _copy_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Carry user-registered hooks across the swap (accelerate and PEFT register some)."""
    for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
        getattr(dst, attr).update(getattr(src, attr))
    for attr in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
        if hasattr(src, attr):
            getattr(dst, attr).update(getattr(src, attr))
