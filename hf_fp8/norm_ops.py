"""RMSNorm fused into the FP8 layers that read its output (q/k/v; gate/up), as one autograd node.

Unfused, a Llama norm writes its BF16 output, the FP8 cast of the layers reading it reads
that output back (twice with tensorwise scaling: amax, then cast) and writes the FP8 row-major
and transposed copies; in the backward each layer's input gradient is a separate GEMM output,
summed into one BF16 tensor by adds (two for q/k/v, one for gate/up) before the norm's backward
reads it. Here:

- forward: a row pass computes only 1/rms per row (:func:`hf_fp8.kernels.norm_swiglu.rms_rstd`),
  and the cast kernels normalize each tile themselves (``rms_norm=`` in
  :mod:`hf_fp8.kernels.quant`): the norm's output is never written in BF16. The codes are bit
  for bit those of the unfused norm followed by the cast (same rstd, same roundings).
- backward: the layers' input gradients go, unsummed, to the norm's backward kernel, which
  sums them in FP32 (:func:`hf_fp8.kernels.norm_swiglu.rms_norm_backward`): no add kernels,
  and one rounding fewer than BF16 adds (the only numerical difference from the unfused path).

At Llama-3-8B shapes (B=2, S=4096, hidden 4096) that is, per layer, one 64 MB BF16 write and
its read-back less per norm in the forward and 3 add kernels (576 MB of traffic) less in the
backward, for one partial gradient more alive at once in the q/k/v backward (64 MB; the
step's peak did not move). Measured on the H100 (8-layer 8B-shaped Llama, B=2, S=4096,
delayed): 171.2-172.2 ms per step against 174.9 ms with the norms on their own
(``benchmarks/results/history/llama_norm_h100.json``, ``llama_e2e_more_h100.json``).

It applies (:func:`norm_input_fusable`) to an RMSNorm patched by
:func:`hf_fp8.integrations.fused_ops.patch_fused_ops` without hooks, followed by 1 to 3
bias-free :class:`hf_fp8.Fp8Linear` layers with one per-tensor config (delayed or tensorwise)
and no hooks, in eager mode, with the norm weight in the input's dtype. Anything else runs the
norm, then the layers, as before. The patched decoder layer
(:mod:`hf_fp8.integrations.fused_ops`) hands the norm to the attention and MLP forwards, which
call :func:`norm_shared_input_linears` / :func:`hf_fp8.mlp_ops.fused_swiglu_mlp`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from hf_fp8._backend import use_triton
from hf_fp8.config import Recipe
from hf_fp8.delayed import training_forward
from hf_fp8.linear import Fp8Linear, _has_hooks
from hf_fp8.linear_ops import _backward, _forward, count_backward

__all__ = ["norm_input_fusable", "norm_shared_input_linears", "fused_norm_linears", "ENABLED"]

# Benchmarks and tests flip this to measure or compare the unfused path.
ENABLED = True

_MARK = "_hf_fp8_fused"  # set by hf_fp8.integrations.fused_ops on the norms it patches


def norm_input_fusable(norm: nn.Module, modules: tuple[nn.Module, ...], x: torch.Tensor) -> bool:
    """Whether ``norm`` can run inside the input cast of ``modules`` (all reading its output)."""
    weight = getattr(norm, "weight", None)
    first = modules[0]
    return (
        ENABLED
        and not torch.compiler.is_compiling()
        and getattr(norm, _MARK, False)
        and not _has_hooks(norm)
        and isinstance(weight, torch.Tensor)
        and weight.dtype == x.dtype
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.numel() > 0
        and 1 <= len(modules) <= 3
        and all(type(m) is Fp8Linear and not _has_hooks(m) and m.bias is None for m in modules)
        and all(m.fp8_config == first.fp8_config for m in modules)
        and first.fp8_config.recipe in (Recipe.DELAYED, Recipe.TENSORWISE)
        and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
        and all(x.shape[-1] == m.in_features for m in modules)
        and weight.shape == (x.shape[-1],)
    )


def rms_rstd(x2d: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """1/rms per row, exactly as the unfused norm computes it on this device."""
    if use_triton(x2d):
        from hf_fp8.kernels.norm_swiglu import rms_rstd as kernel

        return kernel(x2d, weight, eps)
    from hf_fp8.kernels.norm_swiglu_reference import rms_rstd_reference

    return rms_rstd_reference(x2d, eps)


def rms_backward(partials, x2d, weight, rstd, need_dw: bool, residual=None):
    """(dx, dweight or None) of the norm for an output gradient given as partial gradients;
    ``residual``: a gradient x2d also receives (its residual branch), added to dx before rounding."""
    if use_triton(x2d):
        from hf_fp8.kernels.norm_swiglu import rms_norm_backward

        return rms_norm_backward(partials, x2d, weight, rstd, need_dw, residual)
    # the kernel's arithmetic in torch: FP32 sum of the partials, FP32 math, one rounding
    dy = sum(p.float() for p in partials)
    xn = x2d.float() * rstd[:, None]
    dxn = dy * weight.float()
    dx = rstd[:, None] * (dxn - xn * ((dxn * xn).sum(-1, keepdim=True) / x2d.shape[-1]))
    if residual is not None:
        dx = dx + residual.reshape(dx.shape).float()
    dw = (dy * xn.to(x2d.dtype).float()).sum(0).to(weight.dtype) if need_dw else None
    return dx.to(x2d.dtype), dw


class _NormFp8GroupFunction(torch.autograd.Function):
    """``y_i = RMSNorm(x) W_iᵀ`` for 1 to 3 FP8 layers, the norm inside their input cast."""

    @staticmethod
    def forward(ctx, x, norm_w, eps, modules, out_dtype, need_grad, training, pass_input, *weights):
        # pass_input: x is also returned (last), for the caller's residual connection: its
        # gradient then comes back to this node and joins the norm's input gradient in the
        # backward kernel (no separate BF16 add of the two, see fused_norm_linears)
        need_dx = need_grad and x.requires_grad
        need_dnw = need_grad and norm_w.requires_grad
        need_dy = need_dx or need_dnw  # a gradient flows into the norm's output
        need_dw = [need_grad and w.requires_grad for w in weights]
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        rstd = rms_rstd(x2d, norm_w, eps)
        outs, x_t, x_t_scale, w_ts, regen = _forward(
            modules, x2d, weights, [None] * len(modules), out_dtype, need_dy, need_dw, rms=(rstd, norm_w),
            training=training,
        )  # fmt: skip
        ctx.modules, ctx.regen = modules, regen
        ctx.need = (need_dx, need_dnw, need_dy, need_dw)
        ctx.x_shape = x.shape
        ctx.w_t_scales = [scale for _, scale in w_ts]
        ctx.save_for_backward(x_t, x_t_scale, x2d if need_dy else None, norm_w, rstd, *weights, *(t for t, _ in w_ts))
        ctx.pass_input = pass_input
        outs = tuple(o.reshape(*x.shape[:-1], o.shape[-1]) for o in outs)
        return (*outs, x) if pass_input else outs

    @staticmethod
    def backward(ctx, *grad_outs):
        count_backward(ctx.modules)
        x_t, x_t_scale, x2d, norm_w, rstd, *rest = ctx.saved_tensors
        n = len(ctx.modules)
        weights, w_ts = rest[:n], list(zip(rest[n:], ctx.w_t_scales))
        need_dx, need_dnw, need_dy, need_dw = ctx.need
        residual = None
        if ctx.pass_input:  # the gradient of the returned x (the residual branch's)
            *grad_outs, residual = grad_outs
        grads2d = [g.reshape(-1, g.shape[-1]) for g in grad_outs]
        partials, grads_w, _ = _backward(
            ctx.modules, grads2d, x_t, x_t_scale, weights, w_ts, ctx.regen, x2d.dtype if x2d is not None else None,
            need_dy, need_dw, [False] * n, sum_dx=False,
        )  # fmt: skip
        del x_t, grads2d
        grad_x = grad_nw = None
        if need_dy:
            grad_x, grad_nw = rms_backward(partials, x2d, norm_w, rstd, need_dnw, residual if need_dx else None)
            grad_x = grad_x.reshape(ctx.x_shape) if need_dx else None
        return (grad_x, grad_nw, None, None, None, None, None, None, *grads_w)


def norm_shared_input_linears(norm: nn.Module, modules: tuple[nn.Module, ...], x: torch.Tensor):
    """``tuple(m(norm(x)) for m in modules)``: the norm inside the layers' shared input cast when
    :func:`norm_input_fusable`, else the norm, then :func:`hf_fp8.linear.shared_input_linears`."""
    if not norm_input_fusable(norm, modules, x):
        from hf_fp8.linear import shared_input_linears

        return shared_input_linears(modules, norm(x))
    return fused_norm_linears(norm, modules, x)


def fused_norm_linears(norm: nn.Module, modules: tuple[nn.Module, ...], x: torch.Tensor, pass_input: bool = False):
    """:func:`norm_shared_input_linears` for a caller that has checked :func:`norm_input_fusable`
    (the attention and MLP forwards, which fall back their own way): no second check per call.

    ``pass_input=True`` returns ``x`` too (last), to be used instead of ``x`` as the residual
    that the block's output is added to: the residual's gradient then reaches this node, whose
    backward kernel adds it to the norm's input gradient in FP32 (one rounding, and no BF16
    add kernel: in a Llama layer, two adds of (tokens x hidden) per layer and step fewer)."""
    for m in modules:
        m._check_input(x)
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    out_dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
    with torch.autocast(device_type=device_type, enabled=False) if autocast else contextlib.nullcontext():
        return _NormFp8GroupFunction.apply(
            x, norm.weight, float(norm.variance_epsilon), tuple(modules), out_dtype, torch.is_grad_enabled(),
            training_forward(), pass_input, *(m.weight for m in modules),
        )  # fmt: skip
