"""Every FP8 quantization kernel, run by Triton's interpreter, against its torch reference (bit for
bit) and against a float64 check of the rounding itself."""

from __future__ import annotations

import conftest
import pytest
import torch
from helpers import assert_bits_equal

from hf_fp8.kernels import quant as K
from hf_fp8.kernels import quant_reference as R

pytestmark = pytest.mark.skipif(not conftest.INTERPRETER_PATCHED, reason="needs TRITON_INTERPRET=1 (set by conftest)")

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2

SHAPES = [
    (1, 16),  # a single row: the transposed copy is all padding but one column
    (7, 33),  # odd sizes: masks on both dimensions, transposed rows padded 7 -> 16
    (130, 300),  # several tiles in both directions, ragged edges
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rand(shape, dtype):
    # per-row magnitudes spanning 1e-3..1e2 so per-row and per-tensor scales differ
    x = torch.randn(shape) * torch.logspace(-3, 2, shape[0])[:, None]
    return x.to(dtype)


def _check_same(a: K.Fp8Quantized, b: K.Fp8Quantized, what: str) -> None:
    for name in ("data", "data_t", "scale_inv", "amax", "scale"):
        va, vb = getattr(a, name), getattr(b, name)
        assert (va is None) == (vb is None), f"{what}.{name}: one is None"
        if va is not None:
            assert_bits_equal(va, vb, f"{what}.{name}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("f8", [E4M3, E5M2])
def test_tensorwise_matches_reference(shape, dtype, f8):
    x = _rand(shape, dtype)
    for write_y, write_t in [(True, False), (False, True), (True, True)]:
        _check_same(
            K.quantize_tensorwise(x, f8, write_y=write_y, write_t=write_t),
            R.quantize_tensorwise_reference(x, f8, write_y=write_y, write_t=write_t),
            f"tensorwise(y={write_y}, t={write_t})",
        )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rowwise_and_colwise_match_reference(shape, dtype):
    x = _rand(shape, dtype)
    _check_same(K.quantize_rowwise(x, E4M3), R.quantize_rowwise_reference(x, E4M3), "rowwise")
    _check_same(K.quantize_colwise_transposed(x, E4M3), R.quantize_colwise_transposed_reference(x, E4M3), "colwise")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("f8", [E4M3, E5M2])
def test_delayed_cast_matches_reference_and_records_amax(shape, f8):
    x = _rand(shape, torch.bfloat16)
    scale = torch.tensor(37.5)
    slot_k, slot_r = torch.tensor(1e-6), torch.tensor(1e-6)  # a smaller previous value is max-reduced away
    a = K.quantize_delayed(x, f8, scale, slot_k, write_t=True)
    b = R.quantize_delayed_reference(x, f8, scale, slot_r, write_t=True)
    _check_same(a, b, "delayed")
    assert slot_k.item() == x.float().abs().max().item()


@pytest.mark.parametrize("write_t", [False, True])
def test_delayed_cast_keeps_the_scale_it_used(write_t):
    """``keep_scale``: the cast copies out the scale it read (for the backward's re-cast), so a
    later update of the module's buffer does not reach it; the codes are those without it."""
    x = _rand((130, 300), torch.bfloat16)
    for impl in (K.quantize_delayed, R.quantize_delayed_reference):
        buf = torch.tensor([3.0, 37.123456, 5.0])
        kept = impl(x, E4M3, buf[1], torch.tensor(0.0), write_t=write_t, keep_scale=True)
        plain = impl(x, E4M3, buf[1], torch.tensor(0.0), write_t=write_t)
        assert plain.scale is None
        assert kept.scale.shape == () and kept.scale.dtype == torch.float32
        assert kept.scale.data_ptr() != buf.data_ptr() + 4  # its own memory, not the buffer's
        buf[1] = 0.5  # the next update
        assert kept.scale.item() == torch.tensor(37.123456).item()
        _check_same(kept._replace(scale=None), plain, "keep_scale")


def test_non_contiguous_input():
    """A transposed view (stride 1 along rows) goes through the same kernels."""
    x = _rand((300, 130), torch.bfloat16).t()
    assert not x.is_contiguous()
    _check_same(
        K.quantize_tensorwise(x, E4M3, write_t=True), R.quantize_tensorwise_reference(x, E4M3, write_t=True), "t"
    )
    _check_same(K.quantize_rowwise(x, E4M3), R.quantize_rowwise_reference(x, E4M3), "rowwise")


def _half_ulp(q: torch.Tensor, f8: torch.dtype) -> torch.Tensor:
    """Half the spacing of FP8 values around |q| (float64)."""
    mant, min_exp = (3, -6) if f8 == E4M3 else (2, -14)
    mag = q.abs().clamp(min=2.0**min_exp)
    return 0.5 * torch.exp2(torch.floor(torch.log2(mag)) - mant)


@pytest.mark.parametrize("f8", [E4M3, E5M2])
def test_rounding_against_float64(f8):
    """Each FP8 value is the nearest one to x*scale computed in float64 (within FP32's own rounding)."""
    x = _rand((130, 300), torch.float32)
    q = K.quantize_tensorwise(x, f8)
    scale = 1.0 / q.scale_inv.double()
    exact = x.double() * scale
    got = q.data.double()
    err = (got - exact).abs()
    bound = _half_ulp(got, f8) * (1 + 1e-6) + exact.abs() * 2.0**-24
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item()}"
    # and the scale maps amax onto the format's max, as the recipe says
    assert (scale * x.double().abs().max()).item() == pytest.approx(torch.finfo(f8).max, rel=1e-6)


@pytest.mark.parametrize("special", ["zeros", "inf", "nan", "subnormal", "huge"])
@pytest.mark.parametrize(
    "fn",
    [
        lambda x, flag: K.quantize_tensorwise(x, E4M3, write_t=True, nonfinite_flag=flag),
        lambda x, flag: K.quantize_tensorwise(x, E5M2, nonfinite_flag=flag),
        lambda x, flag: K.quantize_rowwise(x, E4M3, nonfinite_flag=flag),
        lambda x, flag: K.quantize_colwise_transposed(x, E4M3, nonfinite_flag=flag),
        lambda x, flag: R.quantize_tensorwise_reference(x, E4M3, write_t=True, nonfinite_flag=flag),
        lambda x, flag: R.quantize_rowwise_reference(x, E4M3, nonfinite_flag=flag),
    ],
    ids=["tensorwise", "tensorwise_e5m2", "rowwise", "colwise", "tensorwise_ref", "rowwise_ref"],
)
def test_scales_never_inf_or_nan(special, fn):
    x = torch.randn(40, 48)
    if special == "zeros":
        x.zero_()
    elif special == "inf":
        x[3, 5] = float("inf")
        x[7, 9] = float("-inf")
    elif special == "nan":
        x[11, 2] = float("nan")
    elif special == "subnormal":
        x = x * 1e-40  # amax below FP32's normal range: the scale must not overflow
    else:
        x = x * 1e30
    flag = torch.zeros(1, dtype=torch.int32)
    q = fn(x, flag)
    assert torch.isfinite(q.scale_inv).all(), q.scale_inv
    assert (q.scale_inv > 0).all()
    nonfinite = special in ("inf", "nan")
    assert flag.item() == int(nonfinite), "non-finite input must be reported through the flag"
    data = q.data if q.data is not None else q.data_t
    finite_out = torch.isfinite(data.float())
    if nonfinite:
        # exactly the non-finite inputs come out as NaN; nothing else is poisoned
        bad = ~torch.isfinite(x)
        bad = bad if q.data is not None else torch.nn.functional.pad(bad, (0, 0, 0, data.shape[1] - x.shape[0])).t()
        assert torch.equal(~finite_out, bad)
    else:
        assert finite_out.all()
    if special == "zeros":
        assert (q.scale_inv == 1).all() and (data.float() == 0).all()


def test_delayed_record_reports_nonfinite():
    x = torch.randn(20, 32)
    x[1, 1] = float("nan")
    flag = torch.zeros(1, dtype=torch.int32)
    slot = torch.zeros(())
    K.quantize_delayed(x, E4M3, torch.tensor(1.0), slot, nonfinite_flag=flag)
    assert flag.item() == 1 and torch.isnan(slot)


@pytest.mark.parametrize("use_max", [True, False])
@pytest.mark.parametrize("margin", [0, 2])
def test_delayed_scale_update_matches_reference(use_max, margin):
    hist = torch.rand(5, 3) * 10
    h_k, h_r = hist.clone(), hist.clone()
    s_k, s_r = torch.ones(3), torch.ones(3)
    K.delayed_scale_update(h_k, s_k, 1, E4M3, use_max=use_max, margin=margin)
    R.delayed_scale_update_reference(h_r, s_r, 1, E4M3, use_max=use_max, margin=margin)
    assert_bits_equal(h_k, h_r, "history")
    assert_bits_equal(s_k, s_r, "scale")
    amax = hist[:, 1].max() if use_max else hist[0, 1]
    assert s_k[1].item() == pytest.approx(448.0 / amax.item() / 2**margin, rel=1e-6)
    assert h_k[0, 1] == 0 and torch.equal(h_k[1:, 1], hist[:-1, 1])  # rolled, newest slot cleared
    assert torch.equal(h_k[:, 0], hist[:, 0]) and s_k[0] == 1  # other columns untouched


@pytest.mark.parametrize("bad", [0.0, float("inf"), float("nan")])
def test_delayed_scale_update_keeps_previous_scale_on_bad_history(bad):
    hist = torch.zeros(4, 3)
    hist[0, 2] = bad
    for impl in (K.delayed_scale_update, R.delayed_scale_update_reference):
        scale = torch.tensor([1.0, 1.0, 3.5])
        flag = torch.zeros(1, dtype=torch.int32)
        impl(hist.clone(), scale, 2, E5M2, nonfinite_flag=flag)
        assert scale[2].item() == 3.5
        assert flag.item() == (0 if bad == 0.0 else 1)


@pytest.mark.parametrize("use_max", [True, False])
def test_delayed_scale_update_ignores_nonfinite_history_entries(use_max):
    """A step whose tensor held inf/NaN recorded a non-finite amax: the max over the history skips it
    (the scale follows the finite amaxes at once, not after amax_history_len steps); the flag says so.
    With most_recent, a non-finite newest entry keeps the previous scale."""
    hist = torch.tensor([[0.0, 0.0, float("nan")], [0.0, 0.0, 3.0], [0.0, 0.0, float("inf")], [0.0, 0.0, 2.0]])
    results = []
    for impl in (K.delayed_scale_update, R.delayed_scale_update_reference):
        scale, flag = torch.tensor([1.0, 1.0, 7.0]), torch.zeros(1, dtype=torch.int32)
        h = hist.clone()
        impl(h, scale, 2, E4M3, use_max=use_max, nonfinite_flag=flag)
        assert flag.item() == 1
        results.append((h, scale))
    (h_k, s_k), (h_r, s_r) = results
    assert_bits_equal(s_k, s_r, "scale")
    assert_bits_equal(h_k, h_r, "history")
    assert s_k[2].item() == (pytest.approx(448.0 / 3.0, rel=1e-6) if use_max else 7.0)
    many = [hist.clone(), hist.clone()]
    scales = [torch.tensor([1.0, 1.0, 7.0]), torch.tensor([1.0, 1.0, 7.0])]
    K.delayed_scale_update_many(many, scales, [2, 2], E4M3, use_max=use_max)
    for sc in scales:
        assert_bits_equal(sc, s_r, "scale (many)")


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="2-D"):
        K.quantize_tensorwise(torch.randn(2, 3, 4), E4M3)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        K.quantize_tensorwise(torch.ones(4, 4, dtype=torch.int32), E4M3)
    with pytest.raises(ValueError, match="empty"):
        K.quantize_tensorwise(torch.randn(0, 16), E4M3)
    with pytest.raises(ValueError, match="fp8_dtype"):
        K.quantize_tensorwise(torch.randn(4, 16), torch.bfloat16)
    with pytest.raises(ValueError, match="amax_slot"):
        K.quantize_delayed(torch.randn(4, 16), E4M3, torch.tensor(1.0), torch.zeros(2))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("f8", [E4M3, E5M2])
def test_cast_with_given_scale_rewrites_the_skipped_transposed_copy(shape, dtype, f8):
    """The backward's Wᵀ: a cast with the forward's scale gives exactly the transposed copy a
    tensorwise cast writing both copies would have given (kernel and reference, bit for bit)."""
    x = _rand(shape, dtype)
    both = K.quantize_tensorwise(x, f8, write_y=True, write_t=True)
    scale = both.scale  # the multiplier the kernel used, which it reports
    assert_bits_equal(scale, R.amax_to_scale_reference(both.amax, float(torch.finfo(f8).max)), "scale")
    k = K.quantize_with_scale(x, f8, scale, write_y=False, write_t=True)
    r = R.quantize_with_scale_reference(x, f8, scale, write_y=False, write_t=True)
    assert k.data is None and r.data is None
    assert_bits_equal(k.data_t, both.data_t, "kernel data_t")
    assert_bits_equal(r.data_t, both.data_t, "reference data_t")
    assert_bits_equal(k.scale_inv, both.scale_inv, "kernel scale_inv")
    assert_bits_equal(r.scale_inv, both.scale_inv, "reference scale_inv")
    with pytest.raises(ValueError, match="scale"):
        K.quantize_with_scale(x, f8, torch.ones(2))


@pytest.mark.parametrize("mode", [0, 1, 2], ids=["fp32-tile", "16bit-operand", "int8-codes"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_transpose_mode_writes_the_same_codes(monkeypatch, mode, dtype):
    """The transposed copy's codes do not depend on what crosses shared memory (TUNING['cast_t_mode']):
    plain, SwiGLU-gated and delayed casts against their references, both copies and the transposed alone."""
    monkeypatch.setitem(K.TUNING, "cast_t_mode", (mode,))
    x = _rand((130, 300), dtype)
    up = (torch.randn(130, 300) * 2).to(dtype)
    for write_y, write_t in [(False, True), (True, True)]:
        kw = dict(write_y=write_y, write_t=write_t)
        _check_same(K.quantize_tensorwise(x, E4M3, **kw), R.quantize_tensorwise_reference(x, E4M3, **kw), "tensorwise")
        _check_same(
            K.quantize_tensorwise(x, E5M2, swiglu_up=up, **kw),
            R.quantize_tensorwise_reference(x, E5M2, swiglu_up=up, **kw),
            "gated",
        )
        slot_k, slot_r = torch.tensor(0.0), torch.tensor(0.0)
        _check_same(
            K.quantize_delayed(x, E4M3, torch.tensor(21.0), slot_k, **kw),
            R.quantize_delayed_reference(x, E4M3, torch.tensor(21.0), slot_r, **kw),
            "delayed",
        )
