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


# ---- SwiGLU's backward fused with the casts of both gradients (hf_fp8.kernels.swiglu_quant) ----
def _triple(shape, seed=7):
    gate, up = _pair(shape, torch.bfloat16, seed)
    grad = (torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)) * 1e-3).to(torch.bfloat16)
    return grad, gate, up


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("f8", [E5M2, E4M3])
@pytest.mark.parametrize("delayed", [False, True], ids=["tensorwise", "delayed"])
@pytest.mark.parametrize("copies", [(True, True), (True, False), (False, True)], ids=["both", "rows", "t"])
def test_swiglu_backward_quantize_equals_unfused(shape, f8, delayed, copies):
    """Codes, scales and recorded amaxes of both gradients: those of the SwiGLU backward kernel
    followed by one cast per gradient; the torch reference likewise against its unfused self."""
    from hf_fp8.kernels.norm_swiglu import _swiglu_bwd
    from hf_fp8.kernels.swiglu_quant import swiglu_backward_quantize
    from hf_fp8.kernels.swiglu_quant_reference import swiglu_backward_quantize_reference, swiglu_backward_reference

    grad, gate, up = _triple(shape)
    write_y, write_t = copies
    for fused_fn, unfused_grads, M in (
        (swiglu_backward_quantize, _swiglu_bwd(grad, gate, up), K),
        (swiglu_backward_quantize_reference, swiglu_backward_reference(grad, gate, up), R),
    ):
        scales = (torch.tensor(3.0e4), torch.tensor(1.5e3)) if delayed else None
        slots = (torch.tensor(0.0), torch.tensor(0.0)) if delayed else None
        twin_slots = (torch.tensor(0.0), torch.tensor(0.0))
        flags = (torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
        fused = fused_fn(grad, gate, up, f8, scales=scales, amax_slots=slots, write_y=write_y, write_t=write_t,
                         nonfinite_flags=flags)  # fmt: skip
        for i, (q, d) in enumerate(zip(fused, unfused_grads)):
            kw = dict(write_y=write_y, write_t=write_t)
            if delayed:
                name = "quantize_delayed" if M is K else "quantize_delayed_reference"
                twin = getattr(M, name)(d, f8, scales[i], twin_slots[i], **kw)
            else:
                name = "quantize_tensorwise" if M is K else "quantize_tensorwise_reference"
                twin = getattr(M, name)(d, f8, **kw)
            _same(q, twin, f"{fused_fn.__name__} grad {i}")
            assert q.amax.item() > 0
        assert int(flags[0]) == int(flags[1]) == 0


def test_swiglu_backward_quantize_flags_nonfinite_and_checks_inputs():
    from hf_fp8.kernels.swiglu_quant import swiglu_backward_quantize

    grad, gate, up = _triple((40, 64))
    grad[3, 5] = float("inf")
    flags = (torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    qg, qu = swiglu_backward_quantize(grad, gate, up, E5M2, write_t=True, nonfinite_flags=flags)
    assert int(flags[0]) == 1 and int(flags[1]) == 1
    assert qg.data[3, 5].float().isnan() and qg.scale_inv.item() == 1.0  # guarded scale, NaN code
    with pytest.raises(ValueError, match="grad"):
        swiglu_backward_quantize(grad[:, :32], gate, up, E5M2)
    with pytest.raises(ValueError, match="swiglu_up"):
        swiglu_backward_quantize(grad, gate, up.float(), E5M2)
    with pytest.raises(ValueError, match="BF16"):
        swiglu_backward_quantize(grad.float(), gate.float(), up.float(), E5M2, write_y=True, write_t=True)
    with pytest.raises(ValueError, match="together"):
        swiglu_backward_quantize(grad, gate, up, E5M2, scales=(torch.tensor(1.0), torch.tensor(1.0)))


@pytest.mark.parametrize("mode", [1, 2], ids=["16bit-operand", "int8-codes"])
def test_swiglu_backward_quantize_transpose_modes(monkeypatch, mode):
    """The gradients' transposed copies are the same codes whichever TUNING['cast_t_mode'] moves them."""
    from hf_fp8.kernels.swiglu_quant import swiglu_backward_quantize
    from hf_fp8.kernels.swiglu_quant_reference import swiglu_backward_quantize_reference

    grad, gate, up = _triple((130, 300))
    monkeypatch.setitem(K.TUNING, "cast_t_mode", (mode,))
    for delayed in (False, True):
        kw = dict(scales=(torch.tensor(3.0e4), torch.tensor(1.5e3)), amax_slots=(torch.tensor(0.0), torch.tensor(0.0)))
        kw_r = dict(scales=kw["scales"], amax_slots=(torch.tensor(0.0), torch.tensor(0.0)))
        got = swiglu_backward_quantize(grad, gate, up, E5M2, **(kw if delayed else {}))
        want = swiglu_backward_quantize_reference(grad, gate, up, E5M2, **(kw_r if delayed else {}))
        for i, (q, r) in enumerate(zip(got, want)):
            _same(q, r, f"mode {mode} grad {i}")
