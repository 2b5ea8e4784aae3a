"""The conftest's interpreter patch: without it Triton's CPU interpreter mis-rounds FP8 casts."""

from __future__ import annotations

import conftest
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

pytestmark = pytest.mark.skipif(not conftest.INTERPRETER_PATCHED, reason="runs only under TRITON_INTERPRET=1")


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, x.to(y_ptr.dtype.element_ty), mask=offs < n)


# 31.9 -> 32 needs the mantissa carry; 126 -> 128 too; 0.5625/0.6875 are ties (round to even);
# 1000 and 1e9 are beyond E4M3's 448 (the GPU saturates); -0.0 keeps its sign.
VALUES = [31.9, 126.0, 0.5625, 0.6875, 1000.0, 1e9, -1e9, -0.0, 3.0e-3, 1.9e-3, 240.0, 232.0]


@pytest.mark.parametrize("dst", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16])
def test_patched_casts_match_torch_and_gpu_saturation(dst):
    x = torch.tensor(VALUES + list(torch.randn(100).tolist()), dtype=torch.float32)
    y = torch.empty(x.numel(), dtype=dst)
    _cast_kernel[(1,)](x, y, x.numel(), BLOCK=128)
    if dst == torch.bfloat16:
        expected = x.to(dst)
    else:
        fmax = torch.finfo(dst).max
        expected = x.clamp(-fmax, fmax).to(dst)
    assert torch.equal(
        y.view(torch.uint8 if y.element_size() == 1 else torch.int16),
        expected.view(torch.uint8 if y.element_size() == 1 else torch.int16),
    )


def test_unpatched_interpreter_would_misround():
    """Proves the patch is needed: Triton's own routine turns 31.9 into 16 (lost carry)."""
    from triton.runtime import interpreter

    assert interpreter._convert_float is conftest._exact_convert_float
    original = conftest._ORIGINAL_CONVERT_FLOAT
    bits = np.array([31.9], dtype=np.float32)
    out = original(bits, tl.float32, tl.float8e4nv, None)
    wrong = torch.from_numpy(np.asarray(out, dtype=np.uint8)).view(torch.float8_e4m3fn).float().item()
    assert wrong != 32.0
