"""A Llama MLP of three FP8 layers, ``down(silu(gate(x)) * up(x))``, as one autograd node whose
SwiGLU runs inside down's input cast.

Unfused, the SwiGLU kernel reads gate and up and writes their product in BF16, then down's
cast reads that product twice (amax, then scale and cast; once with delayed scaling) and
writes its FP8 copies. Here the cast kernels compute ``silu(gate) * up`` themselves
(``swiglu_up=`` in :mod:`hf_fp8.kernels.quant`): the product is never written in BF16. At
Llama-3-8B shapes (B=2, S=4096) that is 235 MB written and 235-470 MB read less per layer.
The codes are bit for bit those of the unfused path (the cast rounds the product to BF16 the
way the SwiGLU kernel does), and so is everything else: the backward is the unfused one's
(down's backward, SwiGLU's backward, gate/up's backward as one group), in one node, except
that SwiGLU's backward runs inside the casts of the two gradients it produces
(:mod:`hf_fp8.kernels.swiglu_quant`): those gradients are never written in BF16 either
(per-tensor recipes; rowwise keeps the unfused backward).

Memory: the node keeps x's FP8 transposed copy (gate/up's weight gradients) and gate/up in
BF16 (SwiGLU's backward needs them); down's FP8 transposed input is re-cast from gate/up in
the backward with the forward's scale (``RECOMPUTE_DOWN_INPUT_T``; same codes) rather than
kept: 117 MB less per Llama-3-8B layer at B=2, S=4096, for one cast per layer and step. The
backward runs down's input gradient, SwiGLU's backward, down's weight gradient, then gate/up,
freeing each FP8 gradient once used, so that fewer of its temporaries are alive at once (its
peak is the step's peak when every earlier layer's activations are still alive).

Given the RMSNorm that precedes it (``fused_swiglu_mlp(..., norm=...)``), the node also owns
that norm: it runs inside gate/up's input cast and its backward sums their input gradients
(:mod:`hf_fp8.norm_ops`).

Eager only: under ``torch.compile`` the MLP keeps the per-layer custom ops of
:mod:`hf_fp8.linear_ops` (this node has no custom-op form yet), and anything that must see
the layers one by one (hooks, PEFT wrappers, biases, non-FP8 layers) takes the unfused path.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from hf_fp8 import norm_ops
from hf_fp8._backend import fp8_gemm_supported, use_triton
from hf_fp8.delayed import training_forward
from hf_fp8.linear import Fp8Linear, _has_hooks
from hf_fp8.linear_ops import _backward, _check_nonfinite, _count_forward, _forward, _gemm_with_weight, count_backward
from hf_fp8.scaling import Role, quantize_operand, quantize_swiglu_grads, transposed_copy

__all__ = ["fused_swiglu_mlp_applies", "fused_swiglu_mlp"]

# Benchmarks and tests flip these to measure or compare the unfused paths; the numbers are the same.
ENABLED = True  # the MLP as one node, SwiGLU inside down's input cast
FUSED_BACKWARD = True  # SwiGLU's backward inside the gate/up gradient casts
RECOMPUTE_DOWN_INPUT_T = True  # down's transposed FP8 input re-cast from gate/up in the backward


def fused_swiglu_mlp_applies(gate: nn.Module, up: nn.Module, down: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`fused_swiglu_mlp` may replace ``down(swiglu(gate(x), up(x)))`` here."""
    modules = (gate, up, down)
    return (
        ENABLED
        and not torch.compiler.is_compiling()
        and all(type(m) is Fp8Linear and not _has_hooks(m) and m.bias is None for m in modules)
        and gate.fp8_config == up.fp8_config
        and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
        and x.numel() > 0
        and x.is_floating_point()
        and x.shape[-1] == gate.in_features == up.in_features
        and gate.out_features == up.out_features == down.in_features
    )


def _swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused SwiGLU's gradients: its Triton kernel, or autograd through its torch reference."""
    if use_triton(gate):
        from hf_fp8.kernels.norm_swiglu import _swiglu_bwd

        return _swiglu_bwd(grad, gate, up)
    from hf_fp8.kernels.norm_swiglu_reference import swiglu_reference

    with torch.enable_grad():
        g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
        return torch.autograd.grad(swiglu_reference(g, u), (g, u), grad)


class _Fp8SwiGLUMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, modules, out_dtype, need_grad, training, w_gate, w_up, w_down, norm_w=None, eps=0.0, pass_input=False
    ):  # fmt: skip
        # norm_w: x is the input of an RMSNorm (that weight, eps) whose output gate/up read; the
        # norm runs inside their input cast and its backward sums their input gradients
        # (hf_fp8.norm_ops). pass_input (with norm_w): x is returned too, for the residual
        # connection; its gradient joins the norm's input gradient in the norm's backward kernel
        gate_m, up_m, down_m = modules
        need_dnw = norm_w is not None and need_grad and norm_w.requires_grad
        need_dx = need_grad and x.requires_grad or need_dnw  # (the norm's output gradient, if normed)
        need_dw = [need_grad and w.requires_grad for w in (w_gate, w_up, w_down)]
        need_dact = need_dx or need_dw[0] or need_dw[1]  # a gradient must flow into gate/up's outputs
        x2d = x.reshape(-1, x.shape[-1])
        rms = None
        if norm_w is not None:
            x2d = x2d.contiguous()
            rms = (norm_ops.rms_rstd(x2d, norm_w, eps), norm_w)
        (g, u), x_t, x_t_scale, w_ts, regen = _forward(
            (gate_m, up_m), x2d, (w_gate, w_up), (None, None), out_dtype, need_dx, need_dw[:2], rms=rms,
            training=training,
        )  # fmt: skip
        ctx.norm = (need_grad and x.requires_grad, need_dnw) if rms is not None else None
        norm_saved = (x2d, *rms) if rms is not None and need_dx else (None, None, None)
        cfg = down_m.fp8_config
        # gate/up stay alive for SwiGLU's backward anyway: down's weight gradient can re-cast
        # its transposed input from them (same scale, same codes) instead of keeping it
        recompute = RECOMPUTE_DOWN_INPUT_T and need_dw[2] and need_dact
        qa = quantize_operand(
            g,
            Role.INPUT,
            cfg,
            want_rows=True,
            want_t=need_dw[2] and not recompute,
            nonfinite_flag=down_m.fp8_nonfinite,
            delayed=down_m._fp8_delayed,
            keep_scale=recompute,
            swiglu_up=u,
            training=training,
        )
        _check_nonfinite(down_m, Role.INPUT, qa)
        emulate = not fp8_gemm_supported(x2d.device)
        _count_forward((down_m,), training)
        y, (w_t_down, w_t_down_scale), regen_down = _gemm_with_weight(
            down_m, w_down, qa.rows, qa.rows_scale, out_dtype, need_dact, emulate, training=training
        )
        ctx.modules = modules
        ctx.need = (need_dx, need_dw, need_dact)
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        ctx.regen = [*regen, regen_down]
        ctx.w_t_scales = [s for _, s in w_ts] + [w_t_down_scale]
        ctx.recompute_down, ctx.down_input_scale = recompute, qa.scale  # (rowwise: no scale, re-derived)
        saved_act = (g, u) if need_dact else (None, None)
        ctx.save_for_backward(x_t, x_t_scale, qa.t, qa.t_scale, *saved_act, w_gate, w_up, w_down,
                              *(t for t, _ in w_ts), w_t_down, *norm_saved)  # fmt: skip
        ctx.pass_input = pass_input
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return (y, x) if pass_input else y

    @staticmethod
    def backward(ctx, dy, residual=None):
        count_backward(ctx.modules)
        (x_t, x_t_scale, a_t, a_t_scale, g, u, w_gate, w_up, w_down, wt_gate, wt_up, wt_down,
         x_normed_in, rstd, norm_w) = ctx.saved_tensors  # fmt: skip
        gate_m, up_m, down_m = ctx.modules
        need_dx, need_dw, need_dact = ctx.need
        w_ts = list(zip((wt_gate, wt_up, wt_down), ctx.w_t_scales))
        dy2d = dy.reshape(-1, dy.shape[-1])
        # Order for memory (every activation of the earlier layers is alive now): down's input
        # gradient, SwiGLU's backward, then down's weight gradient (its transposed input re-cast
        # from gate/up after the BF16 SwiGLU gradient is freed), then gate/up.
        q_dy = quantize_operand(
            dy2d,
            Role.GRAD_OUTPUT,
            down_m.fp8_config,
            want_rows=need_dact,
            want_t=need_dw[2],
            nonfinite_flag=down_m.fp8_nonfinite,
            delayed=down_m._fp8_delayed,
        )
        grad_x = grad_gate = grad_up = quantized = grads = None
        if need_dact:
            grad_a, _, _ = _backward(
                (down_m,), [dy2d], None, None, [w_down], w_ts[2:], ctx.regen[2:], dy.dtype, True, [False], [False],
                quantized_grads=[q_dy],
            )  # fmt: skip
            q_dy = q_dy._replace(rows=None, rows_scale=None)
            if FUSED_BACKWARD and need_dw[0] == need_dw[1]:
                quantized = quantize_swiglu_grads(
                    grad_a, g, u, gate_m.fp8_config, want_rows=need_dx, want_t=need_dw[0],
                    nonfinite_flags=(gate_m.fp8_nonfinite, up_m.fp8_nonfinite),
                    delayed=(gate_m._fp8_delayed, up_m._fp8_delayed),
                )  # fmt: skip
                quantized = list(quantized) if quantized is not None else None  # emptied as used
            grads = [None, None] if quantized is not None else list(_swiglu_backward(grad_a, g, u))
            del grad_a
        grad_down = None
        if need_dw[2]:
            if ctx.recompute_down:
                a_t, a_t_scale = transposed_copy(g, Role.INPUT, down_m.fp8_config, ctx.down_input_scale, swiglu_up=u)
            _, (grad_down,), _ = _backward(
                (down_m,), [dy2d], a_t, a_t_scale, [w_down], w_ts[2:], ctx.regen[2:], dy.dtype, False, [True], [False],
                quantized_grads=[q_dy],
            )  # fmt: skip
        del a_t, q_dy
        if need_dact:
            grad_x, (grad_gate, grad_up), _ = _backward(
                (gate_m, up_m), grads, x_t, x_t_scale, [w_gate, w_up], w_ts[:2], ctx.regen[:2],
                ctx.x_dtype, need_dx, need_dw[:2], [False, False],
                quantized_grads=quantized, sum_dx=ctx.norm is None,
            )  # fmt: skip
        grad_nw = None
        if ctx.norm is not None and need_dx:  # grad_x: gate's and up's input gradients, unsummed
            need_x, need_dnw = ctx.norm
            res = residual if need_x else None  # (pass_input: the returned x's gradient)
            grad_x, grad_nw = norm_ops.rms_backward(grad_x, x_normed_in, norm_w, rstd, need_dnw, res)
            grad_x = grad_x if need_x else None
        if grad_x is not None:
            grad_x = grad_x.reshape(ctx.x_shape)
        return grad_x, None, None, None, None, grad_gate, grad_up, grad_down, grad_nw, None, None


def fused_swiglu_mlp(
    gate: nn.Module,
    up: nn.Module,
    down: nn.Module,
    x: torch.Tensor,
    norm: nn.Module | None = None,
    pass_input: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``down(silu(gate(x)) * up(x))`` for three bias-free :class:`hf_fp8.Fp8Linear` layers (see
    :func:`fused_swiglu_mlp_applies`), with gate and up sharing the input's cast and the SwiGLU
    computed inside down's cast. Same numbers as the unfused layers, bit for bit.

    ``norm``: ``x`` is the input of this RMSNorm, whose output the MLP reads: the norm runs
    inside gate/up's input cast when :func:`hf_fp8.norm_ops.norm_input_fusable` (else first,
    on its own). Same numbers in the forward; its backward sums gate's and up's input
    gradients in FP32 (one rounding, not two).

    ``pass_input=True`` returns ``(output, x)``: use that ``x`` as the residual the output is
    added to. With the norm inside the node, the residual's gradient is added to the norm's
    input gradient in its backward kernel (FP32, one rounding; no BF16 add kernel); otherwise
    ``x`` is the input as given."""
    residual = x
    if norm is not None:
        if not norm_ops.norm_input_fusable(norm, (gate, up), x):
            x, norm = norm(x), None
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    out_dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
    # the emulation's FP32 matmul must not be autocast to BF16 (no context to enter when autocast is off)
    with torch.autocast(device_type=device_type, enabled=False) if autocast else contextlib.nullcontext():
        if norm is None:
            y = _Fp8SwiGLUMLPFunction.apply(
                x, (gate, up, down), out_dtype, torch.is_grad_enabled(), training_forward(),
                gate.weight, up.weight, down.weight,
            )  # fmt: skip
            return (y, residual) if pass_input else y
        return _Fp8SwiGLUMLPFunction.apply(
            x, (gate, up, down), out_dtype, torch.is_grad_enabled(), training_forward(),
            gate.weight, up.weight, down.weight, norm.weight, float(norm.variance_epsilon), pass_input,
        )  # fmt: skip
