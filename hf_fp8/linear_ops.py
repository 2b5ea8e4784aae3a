"""The autograd of :class:`hf_fp8.Fp8Linear`: one forward and one backward for a group of FP8
layers that read the same input, run eagerly by an ``autograd.Function`` and under
``torch.compile`` by two torch custom ops.

Forward, for layers ``i`` reading ``x``: quantize ``x`` once (its FP8 transposed copy is what
the weight gradients need, saved once), quantize each weight (rows only), one ``_scaled_mm``
each. Backward, per layer: quantize ``dY_i``; ``dX += dY_i W_i`` with ``W_iᵀ`` re-cast from the
weight with the forward's scale (:func:`hf_fp8.scaling.transposed_copy`), ``dW_i = dY_iᵀ X``.

Why custom ops under ``torch.compile``: dynamo cannot trace the quantization (Triton
launchers, Python-side delayed-scaling state) and failed with an internal error on a model
with FP8 layers. The ops ``hf_fp8::fp8_linear`` and ``hf_fp8::fp8_linear_backward`` are
opaque to the compiler (fake implementations give it the shapes), so a compiled model keeps
one graph around them. The layers' FP8 state (amax histories, scales, non-finite flags) stays
on the modules, found through a registry keyed by ``id(module)``; only these ops read or
write it, so the compiled graph has nothing to order against. Eager mode keeps the
``autograd.Function``: same functions, without the custom-op dispatch on every call.
"""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch

from hf_fp8 import coverage as _cov
from hf_fp8._backend import fp8_gemm_supported
from hf_fp8.config import NonFinitePolicy, Recipe
from hf_fp8.delayed import in_backward, training_forward
from hf_fp8.gemm import scaled_mm, scaled_mm_blockwise
from hf_fp8.scaling import DelayedScalingState, QuantizedOperand, Role, quantize_operand, transposed_copy

__all__ = ["NonFiniteError", "is_fp8_dtype", "apply_group", "register_module"]

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8_dtype(dtype: torch.dtype) -> bool:
    return dtype in _FP8_DTYPES


class NonFiniteError(FloatingPointError):
    """An FP8 cast saw inf or NaN (raised only with ``Fp8Config(nonfinite="raise")``)."""


def _check_nonfinite(module, role: Role, q: QuantizedOperand) -> None:
    if module.fp8_config.nonfinite is not NonFinitePolicy.RAISE:
        return
    for amax in q.amaxes:
        if not bool(torch.isfinite(amax).all()):
            raise NonFiniteError(
                f"{module.fp8_name or 'Fp8Linear'}: the {role.name.lower().replace('_', ' ')} contains inf or NaN "
                f"(amax={amax.max().item()}); FP8 cannot represent it. Look for an overflow upstream of this layer."
            )


def _a_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scale of a row-major ``a`` operand: scalar, or (M,) -> (M, 1)."""
    return scale if scale.numel() == 1 and scale.dim() == 0 else scale.view(-1, 1)


def _b_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scale of a column-major ``b`` operand: scalar, or (N,) -> (1, N)."""
    return scale if scale.numel() == 1 and scale.dim() == 0 else scale.view(1, -1)


def _gemm(cfg, a, b, scale_a, scale_b, *, b_blocks: str, out_dtype, emulate: bool, use_fast_accum: bool = False):
    """One FP8 GEMM of ``cfg``'s recipe: ``a`` row-major with its rows' scales, ``b`` column-major
    with the scales of ``bᵀ``'s rows. ``b_blocks``: how a blockwise recipe scaled ``b``
    (``"128x128"`` a weight, ``"1x128"`` an activation)."""
    if cfg.recipe is Recipe.BLOCKWISE:
        return scaled_mm_blockwise(
            a, b, scale_a, scale_b, blocks=("1x128", b_blocks), out_dtype=out_dtype, emulate=emulate
        )
    return scaled_mm(
        a, b, _a_scale(scale_a), _b_scale(scale_b), out_dtype=out_dtype, use_fast_accum=use_fast_accum, emulate=emulate
    )


_EMULATION_NOTED = False


def count_backward(modules) -> None:
    """hf_fp8.coverage: these layers ran their backward GEMMs in FP8."""
    for m in modules:
        _cov.count(m, _cov.BACKWARD)


def _count_forward(modules, training: bool) -> None:
    """hf_fp8.coverage: a training forward, a recompute (a forward inside a backward), or neither."""
    if training:
        counter = _cov.FORWARD
    elif in_backward():
        counter = _cov.RECOMPUTE
    else:
        return
    for m in modules:
        _cov.count(m, counter)


def _note_emulation(device: torch.device) -> None:
    """Say once per process that the FP8 GEMMs are emulated here: right numbers, no speed."""
    global _EMULATION_NOTED
    _EMULATION_NOTED = True
    where = "a CPU" if device.type == "cpu" else f"{device} (FP8 tensor cores need compute capability >= 8.9)"
    logging.getLogger("hf_fp8").warning(
        "hf_fp8: FP8 layers on %s are emulated (quantize, dequantize, FP32 matmul): the numerics of the GPU path, "
        "but tens of times slower than BF16; FP8 speed needs an H100-class GPU",
        where,
    )


# ---- the computation, shared by both paths ------------------------------------------------
def _quantize_weight(
    module, weight: torch.Tensor, want_t: bool, keep_scale: bool, training: bool = True
) -> QuantizedOperand:
    """The forward GEMM's weight operand, with the transposed copy when the backward keeps it
    (``Fp8Config.save_weight_transpose``), or with the scale the backward re-casts it with."""
    if is_fp8_dtype(weight.dtype):
        # FP8-only weight (fp8_weights=True): already quantized with one per-tensor scale.
        return QuantizedOperand(weight, module.fp8_weight_scale_inv, None, None, ())
    codes = getattr(weight, "_codes", None)
    if codes is not None:  # gathered by FSDP2 in FP8 (hf_fp8.fsdp_fp8): cast before the gather
        return QuantizedOperand(codes, weight._scale_inv, None, None, ())
    qw = quantize_operand(
        weight,
        Role.WEIGHT,
        module.fp8_config,
        want_rows=True,
        want_t=want_t,
        nonfinite_flag=module.fp8_nonfinite,
        delayed=module._fp8_delayed,
        keep_scale=keep_scale,
        training=training,
    )
    _check_nonfinite(module, Role.WEIGHT, qw)
    return qw


def _forward(
    modules, x2d, weights, biases, out_dtype, need_dx: bool, need_dw: list[bool], recast_input=False, rms=None,
    training: bool = True,
):  # fmt: skip
    """(outputs (M, N_i), Xᵀ FP8 or None, its scale or None, per weight: (Wᵀ, its scale) kept for
    the backward or (None, None), and the scale that re-casts Wᵀ or None).

    ``recast_input``: no Xᵀ (None); the second value is then the scale that re-casts it from X
    in the backward (:func:`hf_fp8.scaling.transposed_copy`), for an X the caller keeps.
    ``rms=(rstd, weight)``: the layers' input is the RMSNorm output of ``x2d``, computed inside
    its cast (:mod:`hf_fp8.norm_ops`). ``training``: :func:`hf_fp8.delayed.training_forward` where
    the forward was called; False (evaluation, generation, a checkpoint's recompute) casts change
    no scaling state (:func:`hf_fp8.scaling.quantize_operand`)."""
    lead = modules[0]
    cfg = lead.fp8_config
    emulate = not fp8_gemm_supported(x2d.device)
    if emulate and not _EMULATION_NOTED:
        _note_emulation(x2d.device)
    _count_forward(modules, training)
    delayed, input_training = lead._fp8_delayed, training
    source = getattr(lead, "_fp8_input_from", None)
    if source is not None:  # one of a group run one by one: the group's input scale, no state of its own
        delayed, input_training = (None, True) if not isinstance(source, DelayedScalingState) else (source, False)
    qx = quantize_operand(
        x2d,
        Role.INPUT,
        cfg,
        want_rows=True,
        want_t=any(need_dw) and not recast_input,
        nonfinite_flag=lead.fp8_nonfinite,
        delayed=delayed,
        keep_scale=recast_input,
        rms_norm=rms,
        training=input_training,
    )
    _check_nonfinite(lead, Role.INPUT, qx)
    outs, w_ts, regen = [], [], []
    for module, weight, bias in zip(modules, weights, biases):
        out, w_t, r = _gemm_with_weight(
            module, weight, qx.rows, qx.rows_scale, out_dtype, need_dx, emulate, training=training
        )
        if bias is not None:
            out = out + bias.to(out_dtype)
        outs.append(out)
        w_ts.append(w_t)
        regen.append(r)
    if recast_input:
        return outs, None, qx.scale, w_ts, regen
    return outs, qx.t, qx.t_scale, w_ts, regen


def _gemm_with_weight(module, weight, a_rows, a_scale, out_dtype, need_dx: bool, emulate: bool, training=True):
    """``a Wᵀ`` for one layer from an FP8 ``a``: the weight's forward cast and one ``_scaled_mm``.
    Returns (output, (Wᵀ, its scale) kept for the backward or (None, None), the scale that
    re-casts Wᵀ in the backward or None)."""
    keep_t = need_dx and module.fp8_config.save_weight_transpose and not is_fp8_dtype(weight.dtype)
    qw = _quantize_weight(module, weight, want_t=keep_t, keep_scale=need_dx and not keep_t, training=training)
    out = _gemm(
        module.fp8_config,
        a_rows,
        qw.rows.t(),
        a_scale,
        qw.rows_scale,
        b_blocks="128x128",
        out_dtype=out_dtype,
        use_fast_accum=module.fp8_config.use_fast_accum,
        emulate=emulate,
    )
    return out, ((qw.t, qw.t_scale) if keep_t else (None, None)), (None if keep_t else qw.scale)


def _weight_transposed(module, weight: torch.Tensor, scale: torch.Tensor | None):
    """(Wᵀ FP8, its scale) for the input-gradient GEMM, made now rather than saved from the forward."""
    if is_fp8_dtype(weight.dtype):  # N is a multiple of 16: the transpose needs no padding
        return weight.t().contiguous(), module.fp8_weight_scale_inv
    codes = getattr(weight, "_codes", None)
    if codes is not None:  # gathered in FP8: one per-tensor scale, so Wᵀ is the codes transposed
        return codes.t().contiguous(), weight._scale_inv
    return transposed_copy(weight, Role.WEIGHT, module.fp8_config, scale)


def _backward(
    modules, grads2d, x_t, x_t_scale, weights, w_ts, regen, x_dtype, need_dx, need_dw, need_db, quantized_grads=None,
    sum_dx=True,
):  # fmt: skip
    """(dX (M, K) or None, [dW_i or None], [db_i or None]).

    ``sum_dx=False``: dX is the list of the layers' input gradients, not summed (a fused
    RMSNorm backward sums them, :mod:`hf_fp8.norm_ops`).

    ``quantized_grads``: the layers' output gradients already quantized (rows if ``need_dx``,
    transposed copies if ``need_dw``), e.g. by a fused SwiGLU backward; ``grads2d`` then only
    serves the bias gradients. A list is emptied as its entries are used (each layer's FP8
    gradients freed before the next layer's GEMMs allocate)."""
    emulate = not fp8_gemm_supported(weights[0].device)
    grad_x = None if sum_dx else []
    grads_w, grads_b = [], []
    for i, (module, weight, g2d) in enumerate(zip(modules, weights, grads2d)):
        grad_w = grad_b = None
        if need_dx or need_dw[i]:
            if quantized_grads is not None:
                qg = quantized_grads[i]
                if isinstance(quantized_grads, list):
                    quantized_grads[i] = None
            else:
                qg = quantize_operand(
                    g2d,
                    Role.GRAD_OUTPUT,
                    module.fp8_config,
                    want_rows=need_dx,
                    want_t=need_dw[i],
                    nonfinite_flag=module.fp8_nonfinite,
                    delayed=module._fp8_delayed,
                )
            _check_nonfinite(module, Role.GRAD_OUTPUT, qg)
            if need_dx:
                # dX (M, K) = dY (M, N) @ W (N, K); W as column-major b is Wᵀ's row-major copy, transposed.
                w_t, w_t_scale = w_ts[i] if w_ts[i][0] is not None else _weight_transposed(module, weight, regen[i])
                gx = _gemm(
                    module.fp8_config, qg.rows, w_t.t(), qg.rows_scale, w_t_scale, b_blocks="128x128",
                    out_dtype=x_dtype, emulate=emulate,
                )  # fmt: skip
                del w_t
                # several layers: their input gradients add up, as autograd would add them
                if not sum_dx:
                    grad_x.append(gx)
                else:
                    grad_x = gx if grad_x is None else grad_x.add_(gx)
            if need_dw[i]:
                # dW (N, K) = dYᵀ (N, M) @ X (M, K); both transposed copies are zero-padded along M.
                grad_w = _gemm(
                    module.fp8_config, qg.t, x_t.t(), qg.t_scale, x_t_scale, b_blocks="1x128",
                    out_dtype=weight.dtype, emulate=emulate,
                )  # fmt: skip
        if need_db[i]:
            grad_b = g2d.sum(0, dtype=torch.float32).to(module.bias.dtype)
        grads_w.append(grad_w)
        grads_b.append(grad_b)
    return grad_x, grads_w, grads_b


# ---- eager: autograd.Function ------------------------------------------------------------
class _Fp8LinearFunction(torch.autograd.Function):
    """``y_i = x W_iᵀ (+ b_i)`` for one or more FP8 layers reading the same ``x``.

    With several layers the first one's input scaling state (delayed history, non-finite
    flag) is the group's; everything else is per layer. ``params`` is ``(w_0, b_0, w_1, ...)``.

    ``recast_input``: keep ``x`` itself (not its FP8 transposed copy) and re-cast that copy in
    the backward with the forward's scale (same codes): less memory when ``x`` stays alive
    anyway, e.g. an attention output its backward keeps.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, modules: tuple, out_dtype: torch.dtype, need_grad: bool, training: bool, recast_input,
        *params,
    ):  # fmt: skip
        weights, biases = params[0::2], params[1::2]
        need_dx = need_grad and x.requires_grad
        need_dw = [need_grad and w.requires_grad for w in weights]
        x2d = x.reshape(-1, x.shape[-1])
        recast_input = recast_input and any(need_dw)
        outs, x_t, x_t_scale, w_ts, regen = _forward(
            modules, x2d, weights, biases, out_dtype, need_dx, need_dw, recast_input, training=training
        )
        ctx.recast_input, ctx.input_scale = recast_input, x_t_scale  # (rowwise: no scale, re-derived)
        if recast_input:
            x_t, x_t_scale = x, None
        ctx.modules = modules
        ctx.need = (need_dx, need_dw, [need_grad and b is not None and b.requires_grad for b in biases])
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        ctx.regen = regen
        ctx.w_t_scales = [scale for _, scale in w_ts]
        # the weights themselves (no copy), so that an in-place change before backward is caught
        ctx.save_for_backward(x_t, x_t_scale, *weights, *(t for t, _ in w_ts))
        return tuple(o.reshape(*x.shape[:-1], o.shape[-1]) for o in outs)

    @staticmethod
    def backward(ctx, *grad_outs: torch.Tensor):
        count_backward(ctx.modules)
        x_t, x_t_scale, *rest = ctx.saved_tensors
        if ctx.recast_input:  # x_t holds x: re-cast its transposed copy
            x = x_t.reshape(-1, x_t.shape[-1])
            x_t, x_t_scale = transposed_copy(x, Role.INPUT, ctx.modules[0].fp8_config, ctx.input_scale)
            del x
        n = len(ctx.modules)
        weights, w_ts = rest[:n], list(zip(rest[n:], ctx.w_t_scales))
        need_dx, need_dw, need_db = ctx.need
        grads2d = [g.reshape(-1, g.shape[-1]) for g in grad_outs]
        grad_x, grads_w, grads_b = _backward(
            ctx.modules, grads2d, x_t, x_t_scale, weights, w_ts, ctx.regen, ctx.x_dtype, need_dx, need_dw, need_db
        )
        if grad_x is not None:
            grad_x = grad_x.reshape(ctx.x_shape)
        return (grad_x, None, None, None, None, None, *(g for pair in zip(grads_w, grads_b) for g in pair))


# ---- torch.compile: custom ops -----------------------------------------------------------
_MODULES: dict[int, weakref.ref] = {}


def register_module(module) -> None:
    """Make ``module`` findable by the custom ops (called when an Fp8Linear is built or unpickled/copied)."""
    _MODULES[id(module)] = weakref.ref(module)


def _lookup(keys: list[int]) -> tuple:
    modules = tuple(_MODULES[k]() for k in keys)
    if any(m is None for m in modules):
        raise RuntimeError("hf_fp8::fp8_linear: a compiled graph refers to an Fp8Linear that no longer exists")
    return modules


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else like.new_empty(0)


def _or_none(t: torch.Tensor) -> torch.Tensor | None:
    return None if t.numel() == 0 else t


@torch.library.custom_op("hf_fp8::fp8_linear", mutates_args=())
def _fp8_linear_op(
    x2d: torch.Tensor,
    weights: list[torch.Tensor],
    keys: list[int],
    out_dtype: torch.dtype,
    need_dx: bool,
    need_dw: list[bool],
    training: bool,
) -> list[torch.Tensor]:
    """[y_0 .. y_n-1, Xᵀ, its scale, (Wᵀ_i, its scale, regen scale_i) for each weight] without bias (the
    caller adds it in the graph, where autograd differentiates it); absent ones as empty tensors.
    ``training``: grad was enabled at the call (inside the op it is not; under ``torch.compile``
    a checkpoint's recompute is not told apart)."""
    no_bias = [None] * len(weights)
    outs, x_t, x_t_scale, w_ts, regen = _forward(
        _lookup(keys), x2d, weights, no_bias, out_dtype, need_dx, need_dw, training=training
    )
    per_weight = [_or_empty(t, x2d) for (w_t, w_s), r in zip(w_ts, regen) for t in (w_t, w_s, r)]
    return [*outs, _or_empty(x_t, x2d), _or_empty(x_t_scale, x2d), *per_weight]


@_fp8_linear_op.register_fake
def _(x2d, weights, keys, out_dtype, need_dx, need_dw, training):
    M, K = x2d.shape
    outs = [x2d.new_empty((M, w.shape[0]), dtype=out_dtype) for w in weights]
    f32 = dict(dtype=torch.float32)
    if any(need_dw):
        cfg = _lookup(keys)[0].fp8_config
        Mp = (M + 127) // 128 * 128 if cfg.recipe is Recipe.BLOCKWISE else (M + 15) // 16 * 16
        x_t = x2d.new_empty((K, Mp), dtype=cfg.forward_format.dtype)
        scale_shape = {Recipe.ROWWISE: (K,), Recipe.BLOCKWISE: (K, -(-Mp // 128))}.get(cfg.recipe, ())
        x_t_scale = x2d.new_empty(scale_shape, **f32)
    else:
        x_t = x_t_scale = x2d.new_empty(0)
    per_weight = []
    for m, w in zip(_lookup(keys), weights):
        cfg = m.fp8_config
        keep_t = need_dx and cfg.save_weight_transpose and not is_fp8_dtype(w.dtype)
        if keep_t:
            N, K = w.shape
            w_t = x2d.new_empty((K, N), dtype=cfg.forward_format.dtype)
            scale_shape = {Recipe.ROWWISE: (K,), Recipe.BLOCKWISE: (-(-K // 128), -(-N // 128))}.get(cfg.recipe, ())
            per_weight += [w_t, x2d.new_empty(scale_shape, **f32), x2d.new_empty(0)]
        else:
            per_tensor = cfg.recipe.per_tensor and not is_fp8_dtype(w.dtype)
            regen = x2d.new_empty((), **f32) if per_tensor else x2d.new_empty(0)
            per_weight += [x2d.new_empty(0), x2d.new_empty(0), regen]
    return [*outs, x_t, x_t_scale, *per_weight]


@torch.library.custom_op("hf_fp8::fp8_linear_backward", mutates_args=())
def _fp8_linear_backward_op(
    grads2d: list[torch.Tensor],
    x_t: torch.Tensor,
    x_t_scale: torch.Tensor,
    weights: list[torch.Tensor],
    per_weight: list[torch.Tensor],
    keys: list[int],
    x_dtype: torch.dtype,
    need_dx: bool,
    need_dw: list[bool],
) -> list[torch.Tensor]:
    """[dX, dW_0 .. dW_n-1]; absent ones as empty tensors. ``per_weight``: the forward's (Wᵀ, its
    scale, regen scale) triples, flattened."""
    n = len(weights)
    modules = _lookup(keys)
    count_backward(modules)  # the op's body runs at every backward, compiled or not
    w_ts = [(_or_none(per_weight[3 * i]), _or_none(per_weight[3 * i + 1])) for i in range(n)]
    regen = [_or_none(per_weight[3 * i + 2]) for i in range(n)]
    grad_x, grads_w, _ = _backward(
        modules, grads2d, _or_none(x_t), _or_none(x_t_scale), weights, w_ts, regen,
        x_dtype, need_dx, need_dw, [False] * n,
    )  # fmt: skip
    like = grads2d[0]
    return [_or_empty(grad_x, like), *(_or_empty(g, like) for g in grads_w)]


@_fp8_linear_backward_op.register_fake
def _(grads2d, x_t, x_t_scale, weights, per_weight, keys, x_dtype, need_dx, need_dw):
    like = grads2d[0]
    grad_x = like.new_empty((like.shape[0], weights[0].shape[1]), dtype=x_dtype) if need_dx else like.new_empty(0)
    grads_w = [like.new_empty(w.shape, dtype=w.dtype) if n else like.new_empty(0) for w, n in zip(weights, need_dw)]
    return [grad_x, *grads_w]


def _setup_context(ctx, inputs, output):
    x2d, weights, keys, out_dtype, need_dx, need_dw, _ = inputs
    n = len(weights)
    x_t, x_t_scale, per_weight = output[n], output[n + 1], output[n + 2 :]
    ctx.save_for_backward(x_t, x_t_scale, *weights, *per_weight)
    ctx.n = n
    ctx.keys = keys
    ctx.x_dtype = x2d.dtype
    ctx.need = (need_dx, need_dw)


def _op_backward(ctx, grad_outputs):
    n = ctx.n
    x_t, x_t_scale, *rest = ctx.saved_tensors
    weights, per_weight = rest[:n], rest[n:]
    need_dx, need_dw = ctx.need
    res = _fp8_linear_backward_op(
        list(grad_outputs[:n]), x_t, x_t_scale, list(weights), list(per_weight), ctx.keys, ctx.x_dtype, need_dx, need_dw
    )
    grad_x = res[0] if need_dx else None
    grads_w = [g if need else None for g, need in zip(res[1:], need_dw)]
    return grad_x, grads_w, None, None, None, None, None


_fp8_linear_op.register_autograd(_op_backward, setup_context=_setup_context)


# ---- entry point ---------------------------------------------------------------------------
def apply_group(modules: tuple, x: torch.Tensor, recast_input: bool = False) -> tuple[torch.Tensor, ...]:
    """``tuple(m(x) for m in modules)`` for Fp8Linear modules sharing one config: one input cast.

    ``recast_input`` (eager only): the backward re-casts ``x``'s FP8 transposed copy from ``x``
    rather than keeping it (see :class:`_Fp8LinearFunction`)."""
    if x.numel() == 0:
        return tuple(torch.zeros(*x.shape[:-1], m.out_features, dtype=x.dtype, device=x.device) for m in modules)
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    out_dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
    # the emulation's FP32 matmul must not be autocast to BF16 (no context to enter when autocast is off)
    with torch.autocast(device_type=device_type, enabled=False) if autocast else contextlib.nullcontext():
        if torch.compiler.is_compiling():
            grad = torch.is_grad_enabled()
            weights = [m.weight for m in modules]
            outs = _fp8_linear_op(
                x.reshape(-1, x.shape[-1]),
                weights,
                [id(m) for m in modules],
                out_dtype,
                grad and x.requires_grad,
                [grad and w.requires_grad for w in weights],
                grad,
            )
            outs = [o if m.bias is None else o + m.bias.to(out_dtype) for o, m in zip(outs, modules)]
            return tuple(o.reshape(*x.shape[:-1], o.shape[-1]) for o in outs)
        params = [p for m in modules for p in (m.weight, m.bias)]
        return _Fp8LinearFunction.apply(
            x, modules, out_dtype, torch.is_grad_enabled(), training_forward(), recast_input, *params
        )
