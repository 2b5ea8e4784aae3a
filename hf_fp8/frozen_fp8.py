"""Frozen linear layers that keep a published FP8 checkpoint's codes and scales as their weight.

Published FP8 checkpoints (transformers' fine-grained ``quant_method: fp8`` with
``weight_scale_inv`` per block, compressed-tensors with ``weight_scale`` per tensor, channel or
block) are fine-tuned with adapters (LoRA): the base weights stay frozen, so they need not be
dequantized into a BF16 copy. :class:`FrozenFp8Linear` stores the checkpoint's E4M3 codes (one
byte per weight) and its scales exactly as read, and computes ``x Wᵀ`` and the input gradient
``dY W`` from the weight dequantized on the fly (FP32 product of code and scale, one rounding
to the input's dtype, which is what transformers' own dequantization computes), a transient
per call: the step holds the codes, never a dense copy. The GEMMs run in the input's dtype
(BF16 on a GPU).

With ``fp8_gemm`` (set by :func:`hf_fp8.from_pretrained` under the ``blockwise`` recipe, for
128x128 blocks), the GEMMs read the codes directly instead: the input (and, in the backward,
the output gradient) is cast to E4M3 in 1x128 tiles, as transformers' own FP8 layers and the
checkpoints' ``activation_scheme: dynamic`` serve them, and Hopper's blockwise scaled GEMM
(:func:`hf_fp8.gemm.scaled_mm_blockwise`; its exact emulation elsewhere) multiplies them with
the weight's codes and block scales. Nothing dense is made, and the backward keeps only the
codes (the weight is frozen: no weight gradient, so no input is saved).

``state_dict()`` gives the dequantized weight in ``compute_dtype`` (a stock checkpoint, as an
:class:`~hf_fp8.Fp8Linear` with FP8-only weights gives); PEFT LoRA wraps the layer like any
``nn.Linear`` and merges through :mod:`hf_fp8.integrations.lora` (dequantized base + delta,
rounded once).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FrozenFp8Linear", "dequantize", "fp8_gemm_layout"]

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, dtype: torch.dtype):
    """``codes * scale`` in FP32, rounded once to ``dtype``; ``scale`` per tensor (one value), per
    output channel ((N, 1) or (N,)) or per ``block = (rows, cols)`` ((ceil(N/rows), ceil(K/cols)))."""
    N, K = codes.shape
    s = scale.float()
    if block is not None:
        bm, bn = block
        s = s.repeat_interleave(bm, 0)[:N].repeat_interleave(bn, 1)[:, :K]
    elif s.numel() != 1:
        s = s.reshape(N, 1)
    else:
        s = s.reshape(())
    return (codes.float() * s).to(dtype)


class _DequantizedLinear(torch.autograd.Function):
    """``x Wᵀ + b`` with W dequantized in the forward and again in the backward: only the codes
    and scales are kept for the backward, never the dense weight."""

    @staticmethod
    def forward(ctx, x, codes, scale, block, bias):
        w = dequantize(codes, scale, block, x.dtype)
        ctx.save_for_backward(codes, scale)
        ctx.block, ctx.has_bias = block, bias is not None
        out = x @ w.t()
        return out if bias is None else out + bias.to(out.dtype)

    @staticmethod
    def backward(ctx, dout):
        codes, scale = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dout @ dequantize(codes, scale, ctx.block, dout.dtype)
        dbias = dout.reshape(-1, dout.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return dx, None, None, None, dbias


class _BlockFp8Linear(torch.autograd.Function):
    """``x Wᵀ + b`` and ``dX = dY W`` as FP8 GEMMs on the codes: 1x128 tiles x 128x128 blocks."""

    @staticmethod
    def forward(ctx, x, codes, scale, bias, module):
        ctx.save_for_backward(codes, scale)
        ctx.has_bias, ctx.module = bias is not None, module
        out = _tiles_times_blocks(x.reshape(-1, x.shape[-1]), codes, scale, x.dtype)
        out = out.reshape(*x.shape[:-1], codes.shape[0])
        return out if bias is None else out + bias.to(out.dtype)

    @staticmethod
    def backward(ctx, dout):
        from hf_fp8 import coverage

        codes, scale = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            coverage.count(ctx.module, coverage.BACKWARD)
            # dY W: W as the column-major b is Wᵀ's row-major codes (a transient byte per weight),
            # its 128x128 blocks the same codes transposed
            dx = _tiles_times_blocks(dout.reshape(-1, dout.shape[-1]), codes.t().contiguous(), scale.t(), dout.dtype)
            dx = dx.reshape(*dout.shape[:-1], codes.shape[1])
        dbias = dout.reshape(-1, dout.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dx, None, None, dbias, None


def _tiles_times_blocks(a: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype):
    """``a`` (M, K) cast to E4M3 in 1x128 tiles, times the (N, K) codes in 128x128 blocks, transposed."""
    from hf_fp8._backend import fp8_gemm_supported
    from hf_fp8.gemm import scaled_mm_blockwise
    from hf_fp8.quantize import quantize_tiles

    qa = quantize_tiles(a, torch.float8_e4m3fn)
    return scaled_mm_blockwise(
        qa.data, codes.t(), qa.scale_inv, scale, blocks=("1x128", "128x128"), out_dtype=out_dtype,
        emulate=not fp8_gemm_supported(a.device),
    )  # fmt: skip


def fp8_gemm_layout(module: nn.Module) -> bool:
    """Whether a frozen layer's codes can feed the blockwise FP8 GEMM: 128x128 blocks, both
    dimensions multiples of 128, E4M3 codes."""
    return (
        getattr(module, "fp8_weight_block", None) == (128, 128)
        and module.weight.dtype == torch.float8_e4m3fn
        and module.in_features % 128 == 0
        and module.out_features % 128 == 0
    )


class FrozenFp8Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is a checkpoint's FP8 codes with their scales.

    ``weight``: the E4M3 codes (N, K), ``requires_grad=False``. ``fp8_weight_scale_inv``: FP32,
    one value, one per output channel (N, 1), or one per block of ``fp8_weight_block = (rows,
    cols)``. ``compute_dtype``: the dtype the layer computes and saves in.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        block: tuple[int, int] | None = None,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if codes.dim() != 2 or codes.dtype not in _FP8:
            raise TypeError(f"FrozenFp8Linear: codes must be a 2-D FP8 tensor, got {tuple(codes.shape)} {codes.dtype}")
        N, K = codes.shape
        expected = _scale_shapes(N, K, block)
        if tuple(scale.shape) not in expected:
            raise ValueError(
                f"FrozenFp8Linear: a ({N}, {K}) weight with block {block} takes a scale of shape "
                f"{' or '.join(map(str, expected))}, got {tuple(scale.shape)}"
            )
        with torch.device("meta"):
            super().__init__(K, N, bias=bias is not None)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        shape = expected[0] if block is not None else (() if scale.numel() == 1 else (N, 1))
        self.register_buffer("fp8_weight_scale_inv", scale.float().reshape(shape).clone(), persistent=False)
        self.fp8_weight_block = None if block is None else (int(block[0]), int(block[1]))
        self.compute_dtype = compute_dtype
        # blockwise FP8 GEMMs on the codes instead of dequantizing (see the module docstring)
        self.fp8_gemm = False

    @property
    def has_fp8_weight(self) -> bool:
        return self.weight.dtype in _FP8

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in ``dtype`` (default ``compute_dtype``): the codes dequantized, exactly."""
        if not self.has_fp8_weight:  # merged by PEFT: a high-precision weight now
            w = self.weight.detach()
            return w if dtype is None else w.to(dtype)
        return dequantize(self.weight, self.fp8_weight_scale_inv, self.fp8_weight_block, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_fp8_weight:
            return nn.functional.linear(
                x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
            )
        if self.fp8_gemm:
            from hf_fp8 import coverage
            from hf_fp8.delayed import in_backward, training_forward

            counter = coverage.FORWARD if training_forward() else (coverage.RECOMPUTE if in_backward() else None)
            if counter is not None:
                coverage.count(self, counter)
            return _BlockFp8Linear.apply(x, self.weight, self.fp8_weight_scale_inv, self.bias, self)
        return _DequantizedLinear.apply(x, self.weight, self.fp8_weight_scale_inv, self.fp8_weight_block, self.bias)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would turn the codes into numbers without their scale: keep the codes
        # (moved) and take the new dtype as the compute dtype; scales stay FP32
        codes = self.weight.detach() if self.has_fp8_weight else None
        out = super()._apply(fn, recurse)
        if codes is not None and self.weight.dtype != codes.dtype:
            self.compute_dtype = self.weight.dtype
            self.weight = nn.Parameter(codes.to(self.weight.device), requires_grad=False)
        if self.fp8_weight_scale_inv.dtype != torch.float32:
            self.fp8_weight_scale_inv = self.fp8_weight_scale_inv.float()
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.has_fp8_weight:  # a stock checkpoint: the dequantized weight
            destination[prefix + "weight"] = self.dense_weight()

    def extra_repr(self) -> str:
        if self.fp8_weight_block is not None:
            scales = f"per {self.fp8_weight_block[0]}x{self.fp8_weight_block[1]} block"
        else:
            scales = "per tensor" if self.fp8_weight_scale_inv.numel() == 1 else "per output channel"
        gemm = "blockwise FP8 GEMMs" if self.fp8_gemm else f"dequantized, compute {self.compute_dtype}"
        return f"{super().extra_repr()}, weight=fp8 codes (frozen), scales {scales}, {gemm}"


def _scale_shapes(N: int, K: int, block: tuple[int, int] | None) -> list[tuple[int, ...]]:
    if block is not None:
        bm, bn = int(block[0]), int(block[1])
        if bm <= 0 or bn <= 0:
            raise ValueError(f"FrozenFp8Linear: block must be positive (rows, cols), got {block}")
        return [(-(-N // bm), -(-K // bn))]
    return [(), (1,), (1, 1), (N, 1), (N,)]
