"""Fused RMSNorm and SwiGLU kernels (Triton interpreter) against float64 and HF's own modules."""

from __future__ import annotations

import pytest
import torch

from hf_fp8.kernels.norm_swiglu import rms_norm, swiglu
from hf_fp8.kernels.norm_swiglu_reference import rms_norm_reference


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])  # BF16: 2^-8 per rounding
@pytest.mark.parametrize("N", [96, 128])  # 96: not a power of two (masked columns)
def test_rms_norm_forward_backward_against_float64(dtype, tol, N):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 70, N, generator=g) * 3).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(N, generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(3, 70, N, generator=g).to(dtype)
    y = rms_norm(x, w, 1e-5)
    y.backward(dy)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = wd * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5))
    ref.backward(dy.double())
    assert y.dtype == dtype and _rel(y, ref) < tol
    assert _rel(x.grad, xd.grad) < tol and _rel(w.grad, wd.grad) < tol
    # HF's module, same dtype: identical up to one rounding of the output
    hf = rms_norm_reference(x.detach(), w.detach(), 1e-5)
    assert _rel(y, hf) < (1e-6 if dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_swiglu_forward_backward_against_float64(dtype, tol):
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(5, 333, generator=g) * 3).to(dtype).requires_grad_()  # 1665 elements: a partial block
    b = torch.randn(5, 333, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(5, 333, generator=g).to(dtype)
    y = swiglu(a, b)
    y.backward(dy)
    ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = torch.nn.functional.silu(ad) * bd
    ref.backward(dy.double())
    assert _rel(y, ref) < tol and _rel(a.grad, ad.grad) < tol and _rel(b.grad, bd.grad) < tol
    with pytest.raises(ValueError, match="differ"):
        swiglu(a, b[:, :10])
