"""hf_fp8.kernels._launch on the CPU: the specialization key and the JIT fallbacks (the cached
path itself needs compiled kernels: tests/test_gpu.py checks it on the GPU)."""

from __future__ import annotations

import conftest
import pytest
import torch

from hf_fp8.kernels import _launch


def test_specialization_key_separates_what_the_jit_specializes_on():
    t = torch.zeros(64, dtype=torch.bfloat16)
    assert _launch._spec(t) == (torch.bfloat16, True)
    assert _launch._spec(t[1:]) == (torch.bfloat16, False)  # 2 bytes in: not 16-byte aligned
    assert _launch._spec(t.float()) != _launch._spec(t)
    assert _launch._spec(1) != _launch._spec(17) != _launch._spec(16) != _launch._spec(32 + 1)
    assert _launch._spec(16) == _launch._spec(32)
    assert _launch._spec(2**31) != _launch._spec(16)  # int64 argument
    assert _launch._spec(True) != _launch._spec(1)
    with pytest.raises(TypeError):
        _launch._spec(None)


@pytest.mark.skipif(not conftest.INTERPRETER_PATCHED, reason="needs TRITON_INTERPRET=1 (set by conftest)")
def test_cpu_tensors_take_the_jit_path_and_cache_nothing():
    from hf_fp8.kernels import quant as K
    from hf_fp8.kernels import quant_reference as R

    _launch._COMPILED.clear()
    x = torch.randn(40, 48)
    a, b = K.quantize_tensorwise(x, torch.float8_e4m3fn), R.quantize_tensorwise_reference(x, torch.float8_e4m3fn)
    assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
    assert not _launch._COMPILED
