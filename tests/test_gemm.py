"""The emulated FP8 GEMM: float64-exact math and the GPU's operand rules enforced on CPU."""

from __future__ import annotations

import pytest
import torch

from hf_fp8.gemm import scaled_mm
from hf_fp8.kernels import quant_reference as R


def test_emulation_against_float64():
    a = R.quantize_rowwise_reference(torch.randn(37, 64), torch.float8_e4m3fn)
    b = R.quantize_rowwise_reference(torch.randn(48, 64), torch.float8_e4m3fn)
    # tensorwise: scalar scales; FP32 accumulation of exact FP8 products over K=64 -> ~1e-7
    sa, sb = torch.tensor(0.37), torch.tensor(2.5)
    out = scaled_mm(a.data, b.data.t(), sa, sb, out_dtype=torch.float32, emulate=True)
    ref = (a.data.double() @ b.data.double().t()) * (0.37 * 2.5)
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-6)
    # rowwise: (M,1) x (1,N) scales, and the BF16 result rounding the GPU kernel applies
    out = scaled_mm(
        a.data, b.data.t(), a.scale_inv.view(-1, 1), b.scale_inv.view(1, -1), out_dtype=torch.float32, emulate=True
    )
    ref = (a.data.double() * a.scale_inv.double()[:, None]) @ (b.data.double() * b.scale_inv.double()[:, None]).t()
    assert out.dtype == torch.float32
    assert torch.equal(out, out.to(torch.bfloat16).float()), "rowwise results pass through BF16 as on the GPU"
    assert torch.allclose(out.double(), ref, rtol=2**-8, atol=1e-6)


def test_gpu_rules_enforced_on_cpu():
    f8 = torch.randn(32, 64).to(torch.float8_e4m3fn)
    s = torch.tensor(1.0)
    with pytest.raises(ValueError, match="multiples of 16"):
        scaled_mm(
            torch.randn(32, 40).to(torch.float8_e4m3fn),
            torch.randn(16, 40).to(torch.float8_e4m3fn).t(),
            s,
            s,
            out_dtype=torch.float32,
            emulate=True,
        )
    with pytest.raises(ValueError, match="column-major"):
        scaled_mm(f8, torch.randn(64, 32).to(torch.float8_e4m3fn), s, s, out_dtype=torch.float32, emulate=True)
    with pytest.raises(TypeError, match="e5m2"):
        e5 = torch.randn(32, 64).to(torch.float8_e5m2)
        scaled_mm(e5, e5.t(), s, s, out_dtype=torch.float32, emulate=True)
    with pytest.raises(TypeError, match="FP8"):
        scaled_mm(torch.randn(32, 64), f8.t(), s, s, out_dtype=torch.float32, emulate=True)
    with pytest.raises(ValueError, match="rowwise scales"):
        scaled_mm(f8, f8.t(), torch.ones(32, 1), torch.ones(32), out_dtype=torch.float32, emulate=True)
