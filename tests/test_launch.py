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


def test_key_of_args_is_the_per_argument_specialization():
    t = torch.zeros(64, dtype=torch.bfloat16)
    p = torch.nn.Parameter(torch.zeros(8))
    args = (t, t[1:], p, 1, 16, 17, 2**31, -5, True, 0.5, t.float())
    assert _launch._key_of_args(args) == tuple(_launch._spec(a) for a in args)
    assert _launch._key_of_args(args) == _launch._key_of_args(args)  # the int memo answers the same
    with pytest.raises(TypeError):
        _launch._key_of_args((t, None))


def test_host_cdiv_and_next_power_of_2_agree_with_triton():
    import triton

    for a in [0, 1, 2, 15, 16, 17, 4095, 4096, 4097, 128256, 2**31 + 3]:
        for b in [1, 16, 64, 1000]:
            assert _launch.cdiv(a, b) == triton.cdiv(a, b)
        if a >= 1:
            assert _launch.next_power_of_2(a) == triton.next_power_of_2(a)


def test_interpreting_reads_the_environment_triton_read():
    import os

    assert _launch.interpreting() == (os.environ.get("TRITON_INTERPRET", "0") == "1")


@pytest.mark.skipif(not conftest.INTERPRETER_PATCHED, reason="needs TRITON_INTERPRET=1 (set by conftest)")
def test_cpu_tensors_take_the_jit_path_and_cache_nothing():
    from hf_fp8.kernels import quant as K
    from hf_fp8.kernels import quant_reference as R

    _launch._COMPILED.clear()
    x = torch.randn(40, 48)
    a, b = K.quantize_tensorwise(x, torch.float8_e4m3fn), R.quantize_tensorwise_reference(x, torch.float8_e4m3fn)
    assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
    assert not _launch._COMPILED
