"""How each recipe turns a high-precision GEMM operand into FP8 data plus dequantization scales.

Every GEMM operand is needed in up to two layouts. For ``Y = X Wᵀ`` (X: M×K, W: N×K):

=========  ==========================  ===========================================
operand    row-major copy (``rows``)    transposed copy (``t``), zero-padded
=========  ==========================  ===========================================
X          forward GEMM, ``a``          weight-grad GEMM, ``b`` (if W needs grad)
W          forward GEMM, ``b``          input-grad GEMM, ``b`` (if X needs grad)
dY         input-grad GEMM, ``a``       weight-grad GEMM, ``a``
=========  ==========================  ===========================================

Tensorwise and delayed scaling share one scale between both copies, so a single fused
pass writes both. Rowwise scaling reduces along the GEMM's K dimension, which is a
different axis for the two copies, so each copy has its own scales; so does blockwise
scaling for activations and gradients (1x128 tiles along each copy's rows), while a weight's
128x128 blocks give both copies the same codes.

The weight's transposed copy is not made in the forward: it would be saved for backward,
one byte per weight element per layer for the whole forward (1.4 GB over the 24 MLP layers
of an 8-layer Llama-3-8B). :func:`transposed_copy` writes it in the backward from the
weight itself with the scale the forward used, bit-identical to what the forward would have
written, at the cost of one more read of the weight.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch

from hf_fp8 import quantize as Q
from hf_fp8.config import AmaxComputeAlgo, Fp8Config, Recipe

__all__ = [
    "Role",
    "QuantizedOperand",
    "DelayedScalingState",
    "quantize_operand",
    "quantize_swiglu_grads",
    "transposed_copy",
]


class Role(enum.IntEnum):
    """Which operand of the linear layer; also the column of the delayed-scaling buffers."""

    INPUT = 0
    WEIGHT = 1
    GRAD_OUTPUT = 2


class QuantizedOperand(NamedTuple):
    rows: torch.Tensor | None  # (R, C) FP8 row-major
    # () or (R,); blockwise: (R, ceil(C/128)) tiles, or (ceil(R/128), ceil(C/128)) for a weight's blocks
    rows_scale: torch.Tensor | None
    t: torch.Tensor | None  # (C, pad16(R)) FP8
    t_scale: torch.Tensor | None  # () or (C,); blockwise: the scale of t's rows, as for rows
    amaxes: tuple[torch.Tensor, ...]  # read only by the ``raise`` non-finite policy
    # per-tensor recipes: the FP32 multiplier the cast used, for :func:`transposed_copy`
    scale: torch.Tensor | None = None


class DelayedScalingState:
    """Host-side view of a module's delayed-scaling buffers (the buffers live on the module).

    The first time each operand is seen there is no history to take a scale from, so that
    cast uses the current amax (tensorwise) and seeds the history with it; from then on,
    each cast first derives the scale from the history and rolls it (one tiny kernel), then
    casts while recording the current amax into the fresh history slot (one pass).
    """

    # states built so far in this process: hf_fp8.delayed's per-forward hook walks a model for
    # its states again only when this changed (a conversion), not at every forward
    created = 0
    # history or scale buffers handed to a state since (Module.to() replaces them): the hook's
    # cached address tables are rebuilt when this changed
    buffers_replaced = 0

    def __init__(self, history: torch.Tensor, scale: torch.Tensor) -> None:
        DelayedScalingState.created += 1
        self._views: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None
        self.history = history
        self.scale = scale
        self.seeded = [False, False, False]
        # set by hf_fp8.delayed's per-forward update, which did the next cast's update in a
        # launch shared by every layer; the cast consumes it instead of launching its own
        self.pending = [False, False, False]

    # the buffers are replaced by Module.to() / .cuda(): a new one drops the views into the old
    @property
    def history(self) -> torch.Tensor:
        return self._history

    @history.setter
    def history(self, value: torch.Tensor) -> None:
        self._history, self._views = value, None
        DelayedScalingState.buffers_replaced += 1

    @property
    def scale(self) -> torch.Tensor:
        return self._scale

    @scale.setter
    def scale(self, value: torch.Tensor) -> None:
        self._scale, self._views = value, None
        DelayedScalingState.buffers_replaced += 1

    def slot_views(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(``scale[slot]``, ``history[0, slot]``): 0-d views, made once per pair of buffers
        (indexing a tensor costs ~1-3 us of host time, twice per cast otherwise)."""
        views = self._views
        if views is None:
            views = self._views = (self._scale.unbind(0), self._history[0].unbind(0))
        return views[0][slot], views[1][slot]

    def seed_from_history(self) -> None:
        """After the history was loaded or restored: a column with a recorded amax seeds its
        scale; an all-zero column still needs a first measurement (one host sync)."""
        self.seeded = [bool(v) for v in (self.history != 0).any(dim=0).tolist()]
        self.pending = [False, False, False]  # an update done on the previous history does not count

    def update_before_cast(self, slot: int, config: Fp8Config, fp8_dtype: torch.dtype) -> None:
        """The scale for this slot's next cast: from the history (one tiny launch), unless the
        model's per-forward update already did it (then only the pending mark is consumed)."""
        if self.pending[slot]:
            self.pending[slot] = False
            return
        Q.delayed_scale_update(
            self.history,
            self.scale,
            slot,
            fp8_dtype,
            use_max=config.amax_compute_algo is AmaxComputeAlgo.MAX,
            margin=config.margin,
        )

    def seed(self, slot: int, amax: torch.Tensor, config: Fp8Config, fp8_max: float) -> None:
        """First cast of a slot (tensorwise, current amax): start the history and scale from it."""
        self.history[0, slot] = amax
        self.scale[slot] = Q.amax_to_scale(amax, fp8_max) * (2.0**-config.margin)
        self.seeded[slot] = True


_FLAG_SLOTS: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}


def flag_slot(nonfinite_flag: torch.Tensor, role: Role) -> torch.Tensor:
    """``nonfinite_flag[role : role + 1]``, the view made once per flag buffer (a slice costs
    host time on every cast otherwise). Keyed by ``id`` and checked by identity, so a new
    buffer at a reused address gets its own views."""
    entry = _FLAG_SLOTS.get(id(nonfinite_flag))
    if entry is None or entry[0] is not nonfinite_flag:
        if len(_FLAG_SLOTS) >= 4096:  # modules come and go (tests, conversions): stay bounded
            _FLAG_SLOTS.clear()
        entry = _FLAG_SLOTS[id(nonfinite_flag)] = (nonfinite_flag, nonfinite_flag.split(1))
    return entry[1][role]


def quantize_operand(
    x: torch.Tensor,
    role: Role,
    config: Fp8Config,
    *,
    want_rows: bool,
    want_t: bool,
    nonfinite_flag: torch.Tensor,
    delayed: DelayedScalingState | None = None,
    keep_scale: bool = False,
    swiglu_up: torch.Tensor | None = None,
    rms_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
    training: bool = True,
) -> QuantizedOperand:
    """Quantize a 2-D operand for ``role`` under ``config``'s recipe.

    ``swiglu_up``: the operand is ``silu(x) * swiglu_up``, computed by the cast itself (the
    SwiGLU output feeding an FP8 layer, never written in high precision).

    ``rms_norm=(rstd, weight)``: the operand is the RMSNorm output of ``x``, computed by the
    cast itself (per-tensor recipes only; see :mod:`hf_fp8.norm_ops`).

    ``keep_scale``: the result's ``scale`` must stay valid for a later :func:`transposed_copy`
    (delayed scaling copies it out of the module's buffer; tensorwise always returns its own).

    ``training=False`` (a forward without grad: evaluation, generation, a reference model, the
    first pass of a reentrant activation checkpoint): no backward follows, so the cast changes no
    scaling state (the non-finite flag, a diagnostic, still records inf/NaN inputs). Delayed scaling casts with the scale its slot holds (the one the last training cast
    used, or the one the model's per-forward update prepared), without updating it and without
    recording the amax, so the same input always gives the same codes, whatever ran before and
    whatever else is in the batch; a slot never seeded casts tensorwise without seeding.
    """
    fmt = config.grad_format if role is Role.GRAD_OUTPUT else config.forward_format
    dtype = fmt.dtype
    flag = flag_slot(nonfinite_flag, role)

    extra = {} if rms_norm is None else {"rms_norm": rms_norm}
    if config.recipe is Recipe.BLOCKWISE:
        if rms_norm is not None:
            raise ValueError("quantize_operand: rms_norm is for per-tensor recipes (delayed, tensorwise)")
        return _quantize_blockwise(x, role, dtype, want_rows, want_t, flag, swiglu_up)
    if config.recipe is Recipe.ROWWISE:
        if rms_norm is not None:
            raise ValueError("quantize_operand: rms_norm is for per-tensor recipes (delayed, tensorwise)")
        rows = Q.quantize_rowwise(x, dtype, nonfinite_flag=flag, swiglu_up=swiglu_up) if want_rows else None
        t = Q.quantize_colwise_transposed(x, dtype, nonfinite_flag=flag, swiglu_up=swiglu_up) if want_t else None
        return _operand_from_copies(rows, t)

    if config.recipe is Recipe.DELAYED and delayed is not None and not training:
        if delayed.seeded[role]:
            scale_view, _ = delayed.slot_views(int(role))
            q = Q.quantize_with_scale(
                x, dtype, scale_view, write_y=want_rows, write_t=want_t, swiglu_up=swiglu_up, **extra
            )
            # no amax measured (the ``raise`` policy checks training casts only)
            kept = scale_view.clone() if keep_scale else None
            return QuantizedOperand(q.data, q.scale_inv, q.data_t, q.scale_inv, (), kept)
        delayed = None  # not seeded: tensorwise, seeding nothing
    if config.recipe is Recipe.DELAYED and delayed is not None and delayed.seeded[role]:
        slot = int(role)
        delayed.update_before_cast(slot, config, dtype)
        scale_view, amax_slot = delayed.slot_views(slot)
        # the scale buffer is updated again by the next cast of this operand (possibly an
        # activation-checkpoint recompute before this backward): the cast copies out the one used here
        q = Q.quantize_delayed(
            x,
            dtype,
            scale_view,
            amax_slot,
            write_y=want_rows,
            write_t=want_t,
            nonfinite_flag=flag,
            swiglu_up=swiglu_up,
            keep_scale=keep_scale,
            **extra,
        )
        scale = q.scale
    else:
        q = Q.quantize_tensorwise(
            x, dtype, write_y=want_rows, write_t=want_t, nonfinite_flag=flag, swiglu_up=swiglu_up, **extra
        )
        scale = q.scale
        if delayed is not None:  # seed the history with the amax just measured
            delayed.seed(int(role), q.amax, config, fmt.max)
    return QuantizedOperand(q.data, q.scale_inv, q.data_t, q.scale_inv, (q.amax,), scale)


def _quantize_blockwise(x, role, dtype, want_rows, want_t, flag, swiglu_up) -> QuantizedOperand:
    """Weights in 128x128 blocks (both copies the same codes, transposed), activations and
    gradients in 1x128 tiles along each copy's rows (the GEMMs' K)."""
    if role is Role.WEIGHT:
        if swiglu_up is not None:
            raise ValueError("quantize_operand: swiglu_up is for activations, not weights")
        q = Q.quantize_blocks(x, dtype, nonfinite_flag=flag)
        t = (q.data.t().contiguous(), q.scale_inv.t().contiguous()) if want_t else (None, None)
        return QuantizedOperand(q.data if want_rows else None, q.scale_inv, *t, (q.amax,))
    rows = Q.quantize_tiles(x, dtype, nonfinite_flag=flag, swiglu_up=swiglu_up) if want_rows else None
    t = Q.quantize_tiles_transposed(x, dtype, nonfinite_flag=flag, swiglu_up=swiglu_up) if want_t else None
    return _operand_from_copies(rows, t)


def _operand_from_copies(rows, t) -> QuantizedOperand:
    """The operand of two independently scaled casts (rowwise, blockwise tiles): either may be None."""
    return QuantizedOperand(
        rows.data if rows else None,
        rows.scale_inv if rows else None,
        t.data_t if t else None,
        t.scale_inv if t else None,
        tuple(q.amax for q in (rows, t) if q is not None),
    )


def quantize_swiglu_grads(
    grad: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    config: Fp8Config,
    *,
    want_rows: bool,
    want_t: bool,
    nonfinite_flags: tuple[torch.Tensor, torch.Tensor],
    delayed: tuple[DelayedScalingState | None, DelayedScalingState | None],
) -> tuple[QuantizedOperand, QuantizedOperand] | None:
    """The GRAD_OUTPUT operands of the gate and up layers, from SwiGLU's backward in one fused pass
    (:func:`hf_fp8.kernels.swiglu_quant.swiglu_backward_quantize`), exactly as
    :func:`quantize_operand` would quantize each unfused gradient under ``config`` (shared by
    both layers) and each layer's delayed state. None where the fused pass does not apply
    (rowwise; both copies of non-BF16 gradients; delayed states seeded differently): the caller
    then takes the unfused path.
    """
    if not config.recipe.per_tensor or (want_rows and want_t and gate.dtype != torch.bfloat16):
        return None
    fmt = config.grad_format
    slot = int(Role.GRAD_OUTPUT)
    flags = tuple(flag_slot(f, Role.GRAD_OUTPUT) for f in nonfinite_flags)
    kw = dict(write_y=want_rows, write_t=want_t, nonfinite_flags=flags)
    if config.recipe is Recipe.DELAYED:
        if any(d is None for d in delayed) or delayed[0].seeded[slot] != delayed[1].seeded[slot]:
            return None
        if delayed[0].seeded[slot]:
            for d in delayed:
                d.update_before_cast(slot, config, fmt.dtype)
            scales, slots = zip(*(d.slot_views(slot) for d in delayed))
            pair = Q.swiglu_backward_quantize(grad, gate, up, fmt.dtype, scales=scales, amax_slots=slots, **kw)
            return tuple(QuantizedOperand(q.data, q.scale_inv, q.data_t, q.scale_inv, (q.amax,)) for q in pair)
    pair = Q.swiglu_backward_quantize(grad, gate, up, fmt.dtype, **kw)
    if config.recipe is Recipe.DELAYED:  # first measurement: seed the histories, as quantize_operand does
        for d, q in zip(delayed, pair):
            d.seed(slot, q.amax, config, fmt.max)
    return tuple(QuantizedOperand(q.data, q.scale_inv, q.data_t, q.scale_inv, (q.amax,), q.scale) for q in pair)


def transposed_copy(
    x: torch.Tensor,
    role: Role,
    config: Fp8Config,
    scale: torch.Tensor | None,
    *,
    swiglu_up: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, t_scale)`` of ``x`` (or of ``silu(x) * swiglu_up``) that an earlier rows-only cast skipped.

    Per-tensor recipes reuse that cast's ``scale`` (:attr:`QuantizedOperand.scale`), so the
    codes are exactly those it would have written; rowwise scales the transposed copy per
    column, independently of the rows (as :func:`quantize_operand` does), so it is simply
    computed now and ``scale`` is ignored.
    """
    fmt = config.grad_format if role is Role.GRAD_OUTPUT else config.forward_format
    if config.recipe is Recipe.BLOCKWISE:  # computed now, as the forward's cast would have
        q = _quantize_blockwise(x, role, fmt.dtype, False, True, None, swiglu_up)
        return q.t, q.t_scale
    if config.recipe is Recipe.ROWWISE:
        t = Q.quantize_colwise_transposed(x, fmt.dtype, swiglu_up=swiglu_up)
        return t.data_t, t.scale_inv
    if scale is None:
        raise ValueError("transposed_copy: a per-tensor recipe needs the scale of the earlier cast")
    t = Q.quantize_with_scale(x, fmt.dtype, scale, write_y=False, write_t=True, swiglu_up=swiglu_up)
    return t.data_t, t.scale_inv
