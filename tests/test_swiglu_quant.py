"""SwiGLU fused into the FP8 cast (``swiglu_up=``): the quantization kernels compute
``silu(gate) * up`` themselves, so the SwiGLU output feeding an FP8 layer never exists in BF16.

The contract: the codes, scales and amaxes are bit for bit those of the unfused path (the SwiGLU
kernel writing BF16, then the cast), for every launcher; and the torch references agree with
the kernels. Run by Triton's interpreter.
"""

from __future__ import annotations

import conftest
import pytest
import torch
from helpers import assert_bits_equal

from hf_fp8.kernels import quant as K
from hf_fp8.kernels import quant_reference as R
from hf_fp8.kernels.norm_swiglu import _swiglu_fwd
from hf_fp8.kernels.norm_swiglu_reference import swiglu_reference

pytestmark = pytest.mark.skipif(not conftest.INTERPRETER_PATCHED, reason="needs TRITON_INTERPRET=1 (set by conftest)")

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
SHAPES = [(7, 33), (130, 300)]  # masks on both dimensions; several tiles with ragged edges


def _pair(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(shape, generator=g) * 3).to(dtype)  # silu's negative lobe and its linear part
    up = (torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[0])[:, None]).to(dtype)
    return gate, up


def _same(a: K.Fp8Quantized, b: K.Fp8Quantized, what: str) -> None:
    for name in ("data", "data_t", "scale_inv", "amax", "scale"):
        va, vb = getattr(a, name), getattr(b, name)
        assert (va is None) == (vb is None), f"{what}.{name}: one is None"
        if va is not None and not (name == "amax" and va.isnan().all()):
            assert_bits_equal(va, vb, f"{what}.{name}")


def _launchers(f8):
    """(name, fn(module, x, **kw)) for every public launcher; delayed gets fresh history slots."""
    scale = torch.tensor(21.0)
    return [
        ("tensorwise", lambda M, x, **kw: M("quantize_tensorwise")(x, f8, write_t=True, **kw)),
        ("delayed", lambda M, x, **kw: M("quantize_delayed")(x, f8, scale, torch.tensor(0.0), write_t=True, **kw)),
        ("with_scale", lambda M, x, **kw: M("quantize_with_scale")(x, f8, scale, write_y=True, **kw)),
        ("rowwise", lambda M, x, **kw: M("quantize_rowwise")(x, f8, **kw)),
        ("colwise", lambda M, x, **kw: M("quantize_colwise_transposed")(x, f8, **kw)),
    ]


def _kernel(name):
    return getattr(K, name)


def _reference(name):
    return getattr(R, name + "_reference")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("f8", [E4M3, E5M2])
def test_fused_swiglu_cast_equals_swiglu_then_cast(shape, dtype, f8):
    gate, up = _pair(shape, dtype)
    unfused_input = _swiglu_fwd(gate, up)  # the Triton SwiGLU kernel, BF16/FP32 output
    for name, fn in _launchers(f8):
        _same(fn(_kernel, gate, swiglu_up=up), fn(_kernel, unfused_input), f"kernel {name}")
        _same(fn(_reference, gate, swiglu_up=up), fn(_reference, swiglu_reference(gate, up)), f"reference {name}")
        if dtype == torch.bfloat16:
            # Triton's sigmoid and torch's silu can differ in the last FP32 bit, which the SwiGLU
            # output's BF16 rounding hides (for these inputs; a tie could still show it). FP32
            # inputs keep that bit: covered by the float64 check below instead.
            _same(fn(_kernel, gate, swiglu_up=up), fn(_reference, gate, swiglu_up=up), f"kernel vs ref {name}")


def test_delayed_records_the_swiglu_output_amax():
    gate, up = _pair((130, 300), torch.bfloat16, seed=3)
    slot = torch.tensor(0.0)
    K.quantize_delayed(gate, E4M3, torch.tensor(2.0), slot, swiglu_up=up)
    expected = (torch.nn.functional.silu(gate.double()) * up.double()).to(torch.bfloat16).abs().max()
    assert slot.item() == expected.item()


@pytest.mark.parametrize("f8", [E4M3, E5M2])
def test_fused_codes_against_float64(f8):
    """Dequantized codes are within one FP8 rounding (plus the BF16 rounding of the SwiGLU
    output) of ``silu(gate) * up`` computed in float64."""
    gate, up = _pair((130, 300), torch.bfloat16, seed=5)
    q = K.quantize_tensorwise(gate, f8, swiglu_up=up)
    exact = torch.nn.functional.silu(gate.double()) * up.double()
    got = q.data.double() * q.scale_inv.double()
    mant, min_exp = (3, -6) if f8 == E4M3 else (2, -14)
    # relative: half an FP8 ulp (2^-(mant+1)) + BF16's half ulp (2^-9) + FP32 slack; absolute: half the
    # smallest subnormal step, in the tensor's scale
    bound = exact.abs() * (2.0 ** -(mant + 1) + 2.0**-9 + 2.0**-20) + 2.0 ** (min_exp - mant - 1) * q.scale_inv.double()
    assert ((got - exact).abs() <= bound).all(), f"worst excess {((got - exact).abs() - bound).max().item()}"


def test_non_contiguous_pair_and_bad_up():
    gate, up = _pair((64, 48), torch.bfloat16)
    gt, ut = gate.t(), up.t().contiguous()  # different strides: both made contiguous
    _same(
        K.quantize_tensorwise(gt, E4M3, write_t=True, swiglu_up=ut),
        K.quantize_tensorwise(_swiglu_fwd(gt, ut), E4M3, write_t=True),
        "strides",
    )
    for bad in (up[:, :16], up.float()):
        with pytest.raises(ValueError, match="swiglu_up"):
            K.quantize_tensorwise(gate, E4M3, swiglu_up=bad)
        with pytest.raises(ValueError, match="swiglu_up"):
            R.quantize_tensorwise_reference(gate, E4M3, swiglu_up=bad)
    with pytest.raises(TypeError, match="swiglu_up"):
        K.quantize_tensorwise(gate, E4M3, swiglu_up=up.tolist())
