"""The blockwise recipe (1x128 activation and gradient tiles, 128x128 weight blocks): its casts
against a float64 reference, its GEMM emulation, Fp8Linear against a float64 evaluation of the
same quantized function, training, and an export whose weights are the codes it trained with."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import assert_bits_equal, rel_err
from llama_fixtures import bigram_batches, sgd_steps, tiny_llama

import hf_fp8
from hf_fp8.gemm import scaled_mm_blockwise
from hf_fp8.kernels import blockwise_reference as B
from hf_fp8.scaling import Role, quantize_operand, transposed_copy

E4M3 = torch.float8_e4m3fn


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a different magnitude per row and column: tiles must each get their own scale
    return (
        torch.randn(*shape, generator=g)
        * torch.logspace(-2, 2, shape[-1])[None, :]
        * (1 + torch.rand(shape[0], 1, generator=g))
    )


def _check_dequantized_close(x: torch.Tensor, deq: torch.Tensor, amax_per_element: torch.Tensor) -> None:
    """E4M3 keeps 3 mantissa bits: a normal value is within half an ulp, 2^-4 relative; values
    below E4M3's smallest normal (2^-6 after scaling) are within half a subnormal step, 2^-10 of
    the scaled range, i.e. amax / 448 * 2^-10 in real units."""
    x, deq = x.double(), deq.double()
    bound = torch.maximum(x.abs() * 2.0**-4, amax_per_element.double() / 448 * 2.0**-10)
    assert ((deq - x).abs() <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize("shape", [(5, 256), (7, 300), (130, 128)])
def test_tiles_against_float64(shape):
    x = _rand(*shape)
    q = B.quantize_tiles(x, E4M3)
    G = -(-shape[1] // 128)
    assert q.data.shape == shape and q.scale_inv.shape == (shape[0], G)
    padded = torch.nn.functional.pad(x.double(), (0, G * 128 - shape[1])).view(shape[0], G, 128)
    amax = padded.abs().amax(2)
    assert torch.equal(q.amax.double(), amax)  # max is exact in any precision
    # the scale is 448 / amax correctly rounded to FP32 (FP64 division, then one rounding), and
    # scale_inv its FP32 reciprocal
    assert torch.equal(q.scale_inv, 1.0 / (448.0 / amax).float())
    tile_amax = amax.repeat_interleave(128, dim=1)[:, : shape[1]]
    _check_dequantized_close(x, B.dequantize_tiles(q.data, q.scale_inv), tile_amax)


def test_transposed_tiles_run_down_the_columns_and_zero_pad():
    x = _rand(100, 256)
    q = B.quantize_tiles_transposed(x, E4M3)
    assert q.data_t.shape == (256, 128) and q.scale_inv.shape == (256, 1)  # whole tiles
    assert (q.data_t[:, 100:].float() == 0).all()
    assert torch.equal(q.data_t[:, :100].float(), B.quantize_tiles(x.t().contiguous(), E4M3).data.float())


@pytest.mark.parametrize("shape", [(256, 384), (200, 130)])
def test_blocks_against_float64(shape):
    w = _rand(*shape, seed=1)
    q = B.quantize_blocks(w, E4M3)
    GR, GC = -(-shape[0] // 128), -(-shape[1] // 128)
    assert q.scale_inv.shape == (GR, GC)
    padded = torch.nn.functional.pad(w.double(), (0, GC * 128 - shape[1], 0, GR * 128 - shape[0]))
    amax = padded.view(GR, 128, GC, 128).abs().amax((1, 3))
    assert torch.equal(q.amax.double(), amax)
    block_amax = amax.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    _check_dequantized_close(w, B.dequantize_blocks(q.data, q.scale_inv), block_amax)


def test_a_weight_block_serves_both_gemms_with_one_rounding():
    """The input-gradient GEMM's Wᵀ is the forward's codes transposed, with the scales transposed."""
    cfg = hf_fp8.Fp8Config(recipe="blockwise")
    w = _rand(256, 384, seed=2).to(torch.bfloat16)
    flag = torch.zeros(3, dtype=torch.float32)
    fwd = quantize_operand(w, Role.WEIGHT, cfg, want_rows=True, want_t=False, nonfinite_flag=flag)
    t, t_scale = transposed_copy(w, Role.WEIGHT, cfg, None)
    assert_bits_equal(t, fwd.rows.t().contiguous(), "Wᵀ")
    assert torch.equal(t_scale, fwd.rows_scale.t())


@pytest.mark.parametrize("blocks", [("1x128", "128x128"), ("1x128", "1x128")])
def test_blockwise_gemm_emulation_against_float64(blocks):
    a = B.quantize_tiles(_rand(64, 384), E4M3)
    quantize_b = B.quantize_tiles if blocks[1] == "1x128" else B.quantize_blocks
    dequantize_b = B.dequantize_tiles if blocks[1] == "1x128" else B.dequantize_blocks
    b = quantize_b(_rand(256, 384, seed=3), E4M3)
    out = scaled_mm_blockwise(
        a.data, b.data.t(), a.scale_inv, b.scale_inv, blocks=blocks, out_dtype=torch.float32, emulate=True
    )
    A, Bd = B.dequantize_tiles(a.data, a.scale_inv).double(), dequantize_b(b.data, b.scale_inv).double()
    ref = A @ Bd.t()
    # the GEMM's result is BF16 (as on the GPU): BF16's unit roundoff, 2^-8 relative per element, plus
    # FP32 accumulation over K=384 products, at most 384 * 2^-24 of the sum of their magnitudes
    bound = ref.abs() * 2.0**-8 + 384 * 2.0**-24 * (A.abs() @ Bd.abs().t())
    assert ((out.double() - ref).abs() <= bound).all()


def test_rows_padded_for_cublas_change_nothing_but_the_alignment():
    """cuBLAS needs the 1x128 scales' leading dimension (M) 16-byte aligned: the GPU path pads M
    with zero rows and unit scales and slices them off; here the same padding goes through the
    emulation, whose first M rows must equal the unpadded product bit for bit."""
    from hf_fp8.gemm import _rows_padded_for_cublas

    a = B.quantize_tiles(_rand(37, 256), E4M3)
    b = B.quantize_blocks(_rand(128, 256, seed=5), E4M3)
    pa, ps = _rows_padded_for_cublas(a.data, a.scale_inv)
    assert pa.shape == (48, 256) and ps.shape == (48, 2) and not pa[37:].float().any()
    kw = dict(blocks=("1x128", "128x128"), out_dtype=torch.float32, emulate=True)
    padded = scaled_mm_blockwise(pa, b.data.t(), ps, b.scale_inv, **kw)
    assert_bits_equal(padded[:37], scaled_mm_blockwise(a.data, b.data.t(), a.scale_inv, b.scale_inv, **kw), "rows")
    assert not padded[37:].any()
    aligned = B.quantize_tiles(_rand(32, 256), E4M3)
    same = _rows_padded_for_cublas(aligned.data, aligned.scale_inv)
    assert same[0] is aligned.data and same[1] is aligned.scale_inv  # aligned: no copy


def test_blockwise_gemm_names_wrong_scale_shapes():
    a = B.quantize_tiles(_rand(64, 256), E4M3)
    b = B.quantize_blocks(_rand(128, 256), E4M3)
    with pytest.raises(ValueError, match=r"scale_b \(128, 2\)"):
        scaled_mm_blockwise(a.data, b.data.t(), a.scale_inv, b.scale_inv, blocks=("1x128", "1x128"),
                            out_dtype=torch.float32, emulate=True)  # fmt: skip


def test_fp8_linear_against_float64_evaluation_of_the_quantized_function():
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 384, bias=True)
    layer = hf_fp8.Fp8Linear.from_linear(copy.deepcopy(base), hf_fp8.Fp8Config(recipe="blockwise"))
    x = _rand(150, 256, seed=4).requires_grad_()
    y = layer(x)
    gy = _rand(150, 384, seed=5)
    y.backward(gy)
    qx, qw = B.quantize_tiles(x.detach(), E4M3), B.quantize_blocks(base.weight.detach(), E4M3)
    Xd, Wd = B.dequantize_tiles(qx.data, qx.scale_inv).double(), B.dequantize_blocks(qw.data, qw.scale_inv).double()
    qg, qgt = B.quantize_tiles(gy, E4M3), B.quantize_tiles_transposed(gy, E4M3)
    qxt = B.quantize_tiles_transposed(x.detach(), E4M3)
    Gd = B.dequantize_tiles(qg.data, qg.scale_inv).double()
    Gtd = B.dequantize_tiles(qgt.data_t, qgt.scale_inv).double()[:, :150]
    Xtd = B.dequantize_tiles(qxt.data_t, qxt.scale_inv).double()[:, :150]
    # each GEMM's result is BF16 (as on the GPU), then cast: 2^-8 relative bounds the rounding
    assert rel_err(Xd @ Wd.t() + base.bias.double(), y) < 2.0**-8
    assert rel_err(Gd @ Wd, x.grad) < 2.0**-8
    assert rel_err(Gtd @ Xtd.t(), layer.weight.grad) < 2.0**-8
    # and the quantized function is close to the real one (FP8's 3 mantissa bits)
    assert rel_err(torch.nn.functional.linear(x.double(), base.weight.double(), base.bias.double()), y) < 0.05


def _tiny(**overrides):
    # head_dim 32 x 4 kv heads: every projection is a multiple of 128
    return tiny_llama(seed=1, num_key_value_heads=4, **overrides)


def test_convert_keeps_layers_128_does_not_divide():
    report = hf_fp8.convert(tiny_llama(), hf_fp8.Fp8Config(recipe="blockwise", auto_filter=False))
    assert "multiples of 128" in report.skipped["model.layers.0.self_attn.k_proj"]  # out 64
    assert "model.layers.0.mlp.down_proj" in report.converted


def test_bad_combinations_name_the_fix():
    with pytest.raises(ValueError, match="blockwise scaling supports only 'e4m3'"):
        hf_fp8.Fp8Config(recipe="blockwise", grad_format="e5m2")
    with pytest.raises(ValueError, match="from_pretrained"):
        hf_fp8.Fp8Config(recipe="blockwise", fp8_weights=True)


def test_training_tracks_high_precision():
    """20 SGD steps of the bigram task: the loss falls, and stays near the FP32 run's (FP8's
    quantization noise, ~2^-4 relative per element, moves a tiny model's loss by under 2%)."""
    ref, fp8 = _tiny(), _tiny()
    hf_fp8.convert(fp8, hf_fp8.Fp8Config(recipe="blockwise", auto_filter=False))
    losses = {}
    for name, model in (("fp32", ref), ("blockwise", fp8)):
        losses[name] = sgd_steps(model, bigram_batches(4, 64, 512, seed=2), 20, lr=0.1)
    assert losses["blockwise"][-1] < losses["blockwise"][0] - 0.3
    assert abs(losses["blockwise"][-1] - losses["fp32"][-1]) < 0.02 * losses["fp32"][-1]


def test_export_writes_the_codes_it_trained_with_and_transformers_reads_them(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    model = _tiny().to(torch.bfloat16)
    report = hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="blockwise", auto_filter=False))
    sgd_steps(model, bigram_batches(2, 32, 512, seed=3), 2)
    hf_fp8.save_fp8(model, tmp_path)
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qcfg["weight_block_size"] == [128, 128]
    saved = load_file(tmp_path / "model.safetensors")
    for name in report.converted:
        layer = model.get_submodule(name)
        fwd = quantize_operand(layer.weight.detach(), Role.WEIGHT, layer.fp8_config, want_rows=True, want_t=False,
                               nonfinite_flag=torch.zeros(3))  # fmt: skip
        assert_bits_equal(saved[f"{name}.weight"], fwd.rows, name)
        assert torch.equal(saved[f"{name}.weight_scale_inv"], fwd.rows_scale)
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=FineGrainedFP8Config(dequantize=True), dtype=torch.bfloat16
    )
    name = report.converted[0]
    served = theirs.get_submodule(name).weight
    layer = model.get_submodule(name)
    q = B.quantize_blocks(layer.weight.detach(), E4M3)
    assert torch.equal(served, B.dequantize_blocks(q.data, q.scale_inv).to(torch.bfloat16))


@pytest.mark.parametrize("shape", [(1, 16), (7, 300), (130, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_tile_casts_are_bit_exact_against_the_reference(shape, dtype):
    """The Triton kernels (under the interpreter) write the reference's bits: codes, scale_inv,
    amax, for both tile copies and the weight blocks, ragged edges and zero padding included, and
    set the non-finite flag."""
    import conftest

    if not conftest.INTERPRETER_PATCHED:
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest)")
    from hf_fp8.kernels import blockwise as K

    x = _rand(*shape, seed=7).to(dtype)
    for kernel, reference in (
        (K.quantize_tiles, B.quantize_tiles),
        (K.quantize_tiles_transposed, B.quantize_tiles_transposed),
    ):
        got, want = kernel(x, E4M3), reference(x, E4M3)
        for name in ("data", "data_t", "scale_inv", "amax"):
            a, b = getattr(got, name), getattr(want, name)
            assert (a is None) == (b is None), name
            if a is not None:
                assert_bits_equal(a, b, f"{kernel.__name__}.{name}")
    w = _rand(max(shape[0], 130), shape[1] + 60, seed=9).to(dtype)  # partial blocks on both axes
    got, want = K.quantize_blocks(w, E4M3), B.quantize_blocks(w, E4M3)
    for name in ("data", "scale_inv", "amax"):
        assert_bits_equal(getattr(got, name), getattr(want, name), f"quantize_blocks.{name}")
    bad = x.clone()
    bad[0, 0] = float("inf")
    flag = torch.zeros(1, dtype=torch.int32)
    q = K.quantize_tiles(bad, E4M3, nonfinite_flag=flag)
    assert flag.item() == 1 and torch.isnan(q.data[0, 0].float())
    assert torch.equal(q.data.view(torch.uint8), B.quantize_tiles(bad, E4M3).data.view(torch.uint8))


def test_the_layer_computes_the_same_bits_with_the_triton_casts():
    import conftest

    if not conftest.INTERPRETER_PATCHED:
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest)")
    base = torch.nn.Linear(256, 128, bias=False).to(torch.bfloat16)
    x = _rand(40, 256, seed=8).to(torch.bfloat16)
    results = []
    for backend in ("torch", "triton"):
        layer = hf_fp8.Fp8Linear.from_linear(copy.deepcopy(base), hf_fp8.Fp8Config(recipe="blockwise"))
        xi = x.clone().requires_grad_()
        with hf_fp8.kernel_backend(backend):
            y = layer(xi)
            y.float().pow(2).sum().backward()
        results.append((y, xi.grad, layer.weight.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_compiled_layer_matches_eager():
    """Under torch.compile the layer runs through hf_fp8's custom ops, whose fake shapes cover the
    blockwise scales: the same bits as eager."""
    base = torch.nn.Linear(256, 128, bias=True)
    eager = hf_fp8.Fp8Linear.from_linear(copy.deepcopy(base), hf_fp8.Fp8Config(recipe="blockwise"))
    compiled = hf_fp8.Fp8Linear.from_linear(copy.deepcopy(base), hf_fp8.Fp8Config(recipe="blockwise"))
    fn = torch.compile(compiled, backend="aot_eager")
    x = _rand(40, 256, seed=10)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    for layer, xi in ((eager, xs[0]), (fn, xs[1])):
        layer(xi).pow(2).sum().backward()
    assert torch.equal(xs[0].grad, xs[1].grad) and torch.equal(eager.weight.grad, compiled.weight.grad)
