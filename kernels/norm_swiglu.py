"""Fused RMSNorm and SwiGLU for Llama (Triton), forward and backward.

RMSNorm: one pass per row computes the FP32 mean square, normalizes, rounds to the input dtype
and scales by the weight (HF's order of operations); it saves only the per-row 1/rms for the
backward, which recomputes the normalized row. SwiGLU: ``silu(gate) * up`` in FP32, one
rounding; the backward recomputes ``silu`` from the saved inputs. Unfused, HF runs 6 kernels for
RMSNorm and keeps an FP32 copy of the row alive for autograd, and 2 kernels for SwiGLU keeping
``silu(gate)``. References: ``norm_swiglu_reference``; Liger-Kernel ships similar kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, interpreting, launch, next_power_of_2

__all__ = ["rms_norm", "rms_norm_backward", "rms_rstd", "swiglu"]


@triton.jit
def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, N, eps, WRITE_Y: tl.constexpr, BLOCK: tl.constexpr):
    # WRITE_Y=False: 1/rms only, for a consumer that normalizes inside its own kernel (the FP8
    # cast of hf_fp8.kernels.quant with rms_norm=...): the same rstd, so the same normed values
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, 0) / N + eps)
    if WRITE_Y:
        normed = (x * rstd).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = (w.to(tl.float32) * normed.to(tl.float32)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + row * N + cols, y, mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_bwd_kernel(
    dy_ptr, dy1_ptr, dy2_ptr, res_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, M, N,
    N_DY: tl.constexpr, HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # ROWS rows per program; the weight gradient is summed per program (partials reduced by torch).
    # N_DY > 1: the output's gradient is the FP32 sum of N_DY partial gradients (one per layer
    # reading the norm's output, e.g. q, k and v), summed here instead of by separate adds.
    # HAS_RES: the input's gradient also gets the residual branch's gradient (the norm's input
    # is a residual stream), added in FP32 before the one rounding, instead of by a BF16 add.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    for i in range(ROWS):
        row = (pid * ROWS + i).to(tl.int64)
        if row < M:
            x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            if N_DY > 1:
                dy += tl.load(dy1_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            if N_DY > 2:
                dy += tl.load(dy2_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xn = x * rstd
            dw += dy * xn.to(x_ptr.dtype.element_ty).to(tl.float32)
            dxn = dy * w
            dx = rstd * (dxn - xn * (tl.sum(dxn * xn, 0) / N))
            if HAS_RES:
                dx += tl.load(res_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid * N + cols, dw, mask=mask)


@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (a * tl.sigmoid(a) * b).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, a_ptr, b_ptr, da_ptr, db_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(da_ptr + offs, (g * b * s * (1.0 + a * (1.0 - s))).to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + offs, (g * a * s).to(db_ptr.dtype.element_ty), mask=mask)


def _interpret() -> bool:
    return interpreting()


def _rms_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float, write_y: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(y with x's shape, or None without ``write_y``; rstd (M,) FP32)."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N).contiguous()
    M = x2.shape[0]
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    y = torch.empty((M, N), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device) if write_y else None
    BLOCK = next_power_of_2(N)
    launch(
        _rms_fwd_kernel,
        (M,),
        (
            x2,
            weight,
            y if write_y else rstd,
            rstd,
            N,
            float(eps),
        ),
        dict(WRITE_Y=write_y, BLOCK=BLOCK),
        1 if _interpret() else 8,
    )
    return (y.view(*x.shape[:-1], N) if write_y else None), rstd


def rms_rstd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """1/rms per row of ``x`` (M,) FP32, exactly as :func:`rms_norm`'s kernel computes it."""
    return _rms_fwd(x, weight, eps, write_y=False)[1]


def _rms_bwd(dy, x, weight, rstd, need_dw: bool, residual=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dy``: the output's gradient, or a list of up to 3 partial gradients summed in FP32;
    ``residual``: a gradient of x's shape added to dx in FP32 (None: nothing)."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N).contiguous()
    M = x2.shape[0]
    dys = [g.reshape(M, N).contiguous() for g in (dy if isinstance(dy, (list, tuple)) else [dy])]
    if not 1 <= len(dys) <= 3:
        raise ValueError(f"rms_norm backward: 1 to 3 partial gradients, got {len(dys)}")
    res = residual.reshape(M, N).contiguous() if residual is not None else dys[0]
    dx = torch.empty_like(x2)
    ROWS = 64 if _interpret() else 16
    n_prog = cdiv(M, ROWS)
    dw_part = torch.empty((n_prog, N), dtype=torch.float32, device=x2.device)
    BLOCK = next_power_of_2(N)
    launch(
        _rms_bwd_kernel,
        (n_prog,),
        (
            dys[0],
            dys[min(1, len(dys) - 1)],
            dys[-1],
            res,
            x2,
            weight,
            rstd,
            dx,
            dw_part,
            M,
            N,
        ),
        dict(N_DY=len(dys), HAS_RES=residual is not None, ROWS=ROWS, BLOCK=BLOCK),
        1 if _interpret() else 8,
    )
    return dx.view(x.shape), dw_part.sum(0).to(weight.dtype) if need_dw else None


def rms_norm_backward(
    partial_grads: list[torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    need_dw: bool,
    residual_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx, dweight or None) of :func:`rms_norm` for an output gradient given as 1 to 3 partial
    gradients (one per layer reading the output), summed in FP32 inside the kernel.
    ``residual_grad``: the gradient x also receives from elsewhere (a residual connection),
    added to dx in FP32 before its one rounding."""
    return _rms_bwd(list(partial_grads), x, weight, rstd, need_dw, residual_grad)


def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    a, b = gate.contiguous(), up.contiguous()
    y = torch.empty_like(a)
    n = a.numel()
    BLOCK = 4096 if _interpret() else 1024
    launch(
        _swiglu_fwd_kernel,
        (cdiv(n, BLOCK),),
        (
            a,
            b,
            y,
            n,
        ),
        dict(BLOCK=BLOCK),
        4,
    )
    return y


def _swiglu_bwd(g: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b, g = gate.contiguous(), up.contiguous(), g.contiguous()
    da, db = torch.empty_like(a), torch.empty_like(b)
    n = a.numel()
    BLOCK = 4096 if _interpret() else 1024
    launch(
        _swiglu_bwd_kernel,
        (cdiv(n, BLOCK),),
        (
            g,
            a,
            b,
            da,
            db,
            n,
        ),
        dict(BLOCK=BLOCK),
        4,
    )
    return da, db


# ---- eager: autograd.Functions ---------------------------------------------------------------
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _rms_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_bwd(dy, x, weight, rstd, weight.requires_grad)
        return dx, dw, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        return _swiglu_bwd(g, gate, up)


# ---- torch.compile: custom ops (dynamo cannot trace the Triton launches) ---------------------
@torch.library.custom_op("hf_fp8::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_fwd(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    y = x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))
    return y, x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("hf_fp8::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_bwd(dy, x, weight, rstd, True)


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rms_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_op_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_backward_op(dy, x, weight, rstd)
    return dx, dw, None


_rms_norm_op.register_autograd(_rms_op_backward, setup_context=_rms_setup)


@torch.library.custom_op("hf_fp8::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _swiglu_fwd(gate, up)


@_swiglu_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("hf_fp8::swiglu_backward", mutates_args=())
def _swiglu_backward_op(g: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _swiglu_bwd(g, gate, up)


@_swiglu_backward_op.register_fake
def _(g, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_op_backward(ctx, g):
    gate, up = ctx.saved_tensors
    return _swiglu_backward_op(g, gate, up)


_swiglu_op.register_autograd(_swiglu_op_backward, setup_context=_swiglu_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused HF ``LlamaRMSNorm`` (autograd-aware; Triton; a custom op under torch.compile)."""
    if torch.compiler.is_compiling():
        return _rms_norm_op(x, weight, float(eps))[0]
    return _RMSNorm.apply(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Fused ``silu(gate) * up`` (autograd-aware; Triton; a custom op under torch.compile)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    if torch.compiler.is_compiling():
        return _swiglu_op(gate, up)
    return _SwiGLU.apply(gate, up)
