"""RMSNorm inside the FP8 input cast of the layers reading its output (``hf_fp8.norm_ops``).

Forward: the codes are those of the unfused norm followed by the cast, bit for bit (same 1/rms,
same roundings), for both kernel backends. Backward: the norm's kernel sums the layers' input
gradients in FP32; checked against a float64 reference, and against the unfused path (BF16
adds) within the rounding that the adds add."""

from __future__ import annotations

import copy

import conftest
import pytest
import torch
from helpers import assert_bits_equal
from llama_fixtures import (
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    losses_with_norms_fused_and_not,
    tiny_llama,
)
from torch import nn

import hf_fp8
from hf_fp8 import norm_ops
from hf_fp8.integrations.fused_ops import patch_fused_ops
from hf_fp8.kernels.norm_swiglu_reference import rms_norm_reference, rms_rstd_reference
from hf_fp8.linear import shared_input_linears

E4M3 = torch.float8_e4m3fn


def _backend(backend):
    if backend == "triton" and not conftest.INTERPRETER_PATCHED:
        pytest.skip("needs TRITON_INTERPRET=1")
    return hf_fp8.kernel_backend(backend)


def _norm_input(R=48, C=96, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(R, C, generator=g) * 3 + 0.5).to(dtype)  # random, never zero
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(dtype)
    return x, w


def _rstd(x, w, eps, backend):
    if backend == "triton":
        from hf_fp8.kernels.norm_swiglu import rms_rstd

        return rms_rstd(x, w, eps)
    return rms_rstd_reference(x, eps)


def _normed(x, w, eps, backend):
    if backend == "triton":
        from hf_fp8.kernels.norm_swiglu import rms_norm

        return rms_norm(x, w, eps)
    return rms_norm_reference(x, w, eps)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
@pytest.mark.parametrize("copies", [(True, True), (True, False), (False, True)], ids=["both", "rows", "t"])
def test_cast_of_normed_input_equals_norm_then_cast(backend, recipe, copies):
    """Row-major and transposed codes, scale and recorded amax: bit for bit those of the norm
    kernel's output cast on its own (R not a multiple of the tile: padded rows included)."""
    from hf_fp8 import quantize as Q

    x, w = _norm_input(R=40)
    eps = 1e-5
    want_y, want_t = copies
    with _backend(backend):
        rstd = _rstd(x, w, eps, backend)
        y = _normed(x, w, eps, backend)
        outs = []
        for src, kw in ((y, {}), (x, {"rms_norm": (rstd, w)})):
            if recipe == "delayed":
                slot = torch.zeros((), dtype=torch.float32)
                q = Q.quantize_delayed(src, E4M3, torch.tensor(3.0), slot, write_y=want_y, write_t=want_t, **kw)
                outs.append((q, slot.clone()))
            else:
                q = Q.quantize_tensorwise(src, E4M3, write_y=want_y, write_t=want_t, **kw)
                outs.append((q, q.amax))
    (ref, ref_amax), (got, got_amax) = outs
    if want_y:
        assert_bits_equal(got.data, ref.data, "rows")
    if want_t:
        assert_bits_equal(got.data_t, ref.data_t, "transposed")
    assert_bits_equal(got.scale_inv, ref.scale_inv, "scale_inv")
    assert_bits_equal(got_amax, ref_amax, "amax")


def test_rms_operand_is_checked():
    from hf_fp8.kernels import quant_reference as R

    x, w = _norm_input()
    rstd = rms_rstd_reference(x, 1e-5)
    with pytest.raises(ValueError, match="rms_norm"):
        R.quantize_tensorwise_reference(x, E4M3, rms_norm=(rstd[:-1], w))
    with pytest.raises(ValueError, match="rms_norm"):
        R.quantize_tensorwise_reference(x, E4M3, rms_norm=(rstd, w.float()))
    with pytest.raises(ValueError, match="at most one"):
        R.quantize_tensorwise_reference(x, E4M3, rms_norm=(rstd, w), swiglu_up=x)


def _norm_backward_float64(partials, x, w, eps):
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps))
    dy = sum(p.double() for p in partials)
    return torch.autograd.grad(y, (x64, w64), dy)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n_partials", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_backward_sums_partials_against_float64(backend, n_partials, dtype):
    """dx and dweight from 1-3 partial output gradients against float64 autograd of the exact norm.
    Tolerances: FP32 arithmetic over 96-element rows (~1e-6 relative) for FP32 inputs; for BF16,
    the norm's forward rounds the normalized value to BF16 (which the reference does not), so
    dweight carries up to half a BF16 ulp (2^-9) per product, and dx is rounded to BF16 once."""
    x, w = _norm_input(dtype=dtype)
    g = torch.Generator().manual_seed(1)
    partials = [(torch.randn(x.shape, generator=g) * (i + 1)).to(dtype) for i in range(n_partials)]
    eps = 1e-5
    with _backend(backend):
        rstd = _rstd(x, w, eps, backend)
        dx, dw = norm_ops.rms_backward(partials, x, w, rstd, True)
    ref_dx, ref_dw = _norm_backward_float64(partials, x, w, eps)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert dx.dtype == dtype and dw.dtype == dtype
    assert (dx.double() - ref_dx).abs().max() <= tol * ref_dx.abs().max()
    assert (dw.double() - ref_dw).abs().max() <= tol * ref_dw.abs().max()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_backward_adds_the_residual_gradient(backend, dtype):
    """dx + the residual branch's gradient, added in FP32 before dx's one rounding: against
    float64 (tolerances as above), and, in BF16, no less accurate on average than rounding dx
    first and adding in BF16 (what autograd's add of the two gradients does)."""
    x, w = _norm_input(dtype=dtype)
    g = torch.Generator().manual_seed(2)
    partials = [(torch.randn(x.shape, generator=g) * (i + 1)).to(dtype) for i in range(2)]
    residual = (torch.randn(x.shape, generator=g) * 0.5).to(dtype)
    eps = 1e-5
    with _backend(backend):
        rstd = _rstd(x, w, eps, backend)
        dx, dw = norm_ops.rms_backward(partials, x, w, rstd, True, residual)
        dx_alone, dw_alone = norm_ops.rms_backward(partials, x, w, rstd, True)
    assert_bits_equal(dw, dw_alone, "dweight does not see the residual")
    ref_dx, _ = _norm_backward_float64(partials, x, w, eps)
    ref_dx = ref_dx + residual.double()
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert (dx.double() - ref_dx).abs().max() <= tol * ref_dx.abs().max()
    if dtype == torch.bfloat16:
        two_roundings = (dx_alone + residual).double()
        assert (dx.double() - ref_dx).abs().mean() <= (two_roundings - ref_dx).abs().mean()


def _group(recipe, seed=0, n=3, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    cfg = hf_fp8.Fp8Config(recipe=recipe)
    outs = (64, 32, 32)[:n]
    layers = tuple(hf_fp8.Fp8Linear.from_linear(nn.Linear(96, o, bias=False), cfg).to(dtype) for o in outs)
    norm = nn.Module()
    norm.weight = nn.Parameter(_norm_input(dtype=dtype)[1].clone())
    norm.variance_epsilon = 1e-5
    norm._hf_fp8_fused = True  # what hf_fp8.integrations.fused_ops marks its patched norms with

    def forward(x):  # the patched norm's forward: the kernel, or the reference on the torch backend
        if hf_fp8._backend.use_triton(x):
            from hf_fp8.kernels.norm_swiglu import rms_norm

            return rms_norm(x, norm.weight, norm.variance_epsilon)
        return rms_norm_reference(x, norm.weight, norm.variance_epsilon)

    norm.forward = forward
    return norm, layers


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
@pytest.mark.parametrize("n", [3, 2])
def test_norm_group_equals_unfused(backend, recipe, n):
    """Over three steps (delayed: history-derived scales from the second): outputs and weight
    gradients bit for bit; x and norm-weight gradients within the BF16 rounding of the unfused
    path's adds (its partial sums are rounded to BF16, the fused kernel sums in FP32)."""
    fused_norm, fused = _group(recipe, n=n)
    ref_norm, ref = _group(recipe, n=n)  # the same seed: the same weights
    applied = []
    original = norm_ops._NormFp8GroupFunction.apply
    with _backend(backend):
        for step in range(3):
            x, _ = _norm_input(R=40, seed=10 + step)
            x = (x * (1 + step)).requires_grad_()
            x_ref = x.detach().clone().requires_grad_()
            norm_ops._NormFp8GroupFunction.apply = lambda *a: applied.append(1) or original(*a)
            try:
                outs = norm_ops.norm_shared_input_linears(fused_norm, fused, x)
            finally:
                norm_ops._NormFp8GroupFunction.apply = original
            refs = shared_input_linears(ref, ref_norm(x_ref))
            g = torch.Generator().manual_seed(step)
            grads = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
            torch.autograd.backward(outs, grads)
            torch.autograd.backward(refs, grads)
            for o, r in zip(outs, refs):
                assert_bits_equal(o, r, f"step {step} output")
            for a, b in zip(fused, ref):
                assert_bits_equal(a.weight.grad, b.weight.grad, f"step {step} weight grad")
                if recipe == "delayed":
                    assert_bits_equal(a._fp8_delayed.history, b._fp8_delayed.history, f"step {step} history")
            for got, want in ((x.grad, x_ref.grad), (fused_norm.weight.grad, ref_norm.weight.grad)):
                err = (got.float() - want.float()).abs().max()
                assert err <= 2**-7 * want.float().abs().max(), (step, err)
            for p in (*fused, *ref, fused_norm, ref_norm):
                p.weight.grad = None
    assert len(applied) == 3


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_norm_group_passes_its_input_for_the_residual(backend, recipe):
    """``pass_input=True``: the same outputs, bit for bit, plus x (an alias of it); a residual
    connection built on that alias sends its gradient into this node, whose x gradient is then
    the norm's input gradient with it added in FP32 (rms_backward's ``residual``), and the
    weight gradients are unchanged."""
    fused_norm, fused = _group(recipe)
    twin_norm, twin = _group(recipe)
    x, _ = _norm_input(R=40, seed=3)
    x = x.requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    g = torch.Generator().manual_seed(4)
    with _backend(backend):
        *outs, alias = norm_ops.fused_norm_linears(fused_norm, fused, x, pass_input=True)
        assert alias.data_ptr() == x.data_ptr() and torch.equal(alias, x)
        refs = norm_ops.fused_norm_linears(twin_norm, twin, x2)
        for o, r in zip(outs, refs):
            assert_bits_equal(o, r, "output")
        grads = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
        residual = torch.randn(x.shape, generator=g).to(x.dtype)
        torch.autograd.backward([*outs, alias], [*grads, residual])
        torch.autograd.backward(refs, grads)  # x2.grad: the norm's input gradient alone
        for a, b in zip(fused, twin):
            assert_bits_equal(a.weight.grad, b.weight.grad, "weight grad")
        assert_bits_equal(fused_norm.weight.grad, twin_norm.weight.grad, "norm weight grad")
        # the kernel's FP32 add of the residual, against rounding x2's gradient first: within one rounding
        err = (x.grad.float() - (x2.grad.float() + residual.float())).abs().max()
        assert err <= 2**-7 * x.grad.float().abs().max()
        assert not torch.equal(x.grad, x2.grad)  # the residual's gradient did arrive


def test_norm_group_falls_back():
    """Rowwise, a hooked norm, FP32 input, biases: the norm runs first (its hooks fire) and the
    layers as before; the fused node is not used."""
    norm, layers = _group("delayed")
    x = _norm_input()[0]
    assert norm_ops.norm_input_fusable(norm, layers, x)
    assert not norm_ops.norm_input_fusable(norm, layers, x.float())
    assert not norm_ops.norm_input_fusable(norm, layers + layers[:1], x)  # more than 3
    rowwise = _group("rowwise")[1]
    assert not norm_ops.norm_input_fusable(norm, rowwise, x)
    seen = []
    handle = norm.register_forward_hook(lambda m, a, o: seen.append(o))
    assert not norm_ops.norm_input_fusable(norm, layers, x)
    outs = norm_ops.norm_shared_input_linears(norm, layers, x)
    assert len(seen) == 1 and len(outs) == 3
    handle.remove()
    try:
        norm_ops.ENABLED = False
        assert not norm_ops.norm_input_fusable(norm, layers, x)
    finally:
        norm_ops.ENABLED = True


def _model(recipe="delayed", **overrides):
    model = tiny_llama(**overrides).to(torch.bfloat16)
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe=recipe, auto_filter=False, exclude=("lm_head",)))
    return model


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_llama_with_norms_in_casts_trains_like_unfused(recipe, monkeypatch):
    """A converted BF16 Llama: each norm runs inside its consumers' casts (2 per layer), the first
    step's loss is bit-identical to the unfused path's, and three steps stay within 1%."""
    model = _model(recipe)
    twin = copy.deepcopy(model)
    calls = []
    real = norm_ops.rms_rstd
    monkeypatch.setattr(norm_ops, "rms_rstd", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (2, 24), generator=g) for _ in range(3)]
    losses = losses_with_norms_fused_and_not(model, twin, batches)
    assert len(calls) == 3 * 2 * model.config.num_hidden_layers
    assert_bits_equal(losses[0][0], losses[1][0], "first loss")
    for a, b in zip(*losses):
        assert abs(a.item() - b.item()) <= 0.01 * abs(b.item())


def test_llama_layers_add_residual_gradients_in_the_norm_kernels(monkeypatch):
    """The patched decoder layers hand both residuals to their norms' nodes (2 per layer, each
    norm's backward getting a residual gradient); the forward is unchanged (same loss, bit for
    bit, as with HF's residual adds). Gradients: the last MLP's are unchanged (it runs before
    any residual gradient is added); the last o_proj's, one BF16 rounding of its output gradient
    away, within 2% (norm-relative: the rounding flips a few E5M2 codes of the gradient cast,
    each worth up to 25%); every other within 12%, the size CPU-NOTES gives for one rounding
    flip amplified through two FP8 layers (10-13%; measured here: 8.3% at most)."""
    from hf_fp8.integrations import fused_ops

    model = _model("delayed")
    twin = copy.deepcopy(model)
    seen = []
    real = norm_ops.rms_backward
    monkeypatch.setattr(norm_ops, "rms_backward", lambda *a: seen.append(a[5] is not None) or real(*a))
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert seen == [True] * 2 * model.config.num_hidden_layers
    monkeypatch.setattr(fused_ops, "PASS_RESIDUAL", False)
    seen.clear()
    twin_loss = twin(input_ids=ids, labels=ids).loss
    twin_loss.backward()
    assert seen == [False] * 2 * model.config.num_hidden_layers
    assert_bits_equal(loss, twin_loss, "loss")
    last = f"model.layers.{model.config.num_hidden_layers - 1}."
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        rel = ((p.grad.float() - q.grad.float()).norm() / q.grad.float().norm()).item()
        if name.startswith(last + "mlp.") or not name.startswith("model.layers."):
            assert rel == 0 or name == "model.embed_tokens.weight", (name, rel)
        limit = 0.02 if name == last + "self_attn.o_proj.weight" else 0.12
        assert rel <= limit, (name, rel)


def test_decoder_patch_keeps_hf_paths():
    """Gradient checkpointing keeps the fused path (the norm inside the casts, in the first pass and
    in the recompute) and the same loss; hooks on a norm fire; an MLP not patched by hf_fp8 gets
    the norm's output, as in HF. (Tensorwise: no scaling state, so repeated forwards are comparable.)"""
    model = _model("tensorwise")
    ids = torch.randint(0, 512, (2, 16))
    ref = model(input_ids=ids, labels=ids).loss
    layer = model.model.layers[0]
    seen = []
    h = layer.input_layernorm.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    assert torch.equal(model(input_ids=ids, labels=ids).loss, ref)
    assert seen == [(2, 16, 128)]
    h.remove()
    enable_activation_checkpointing(model)
    model.train()
    calls = []
    real = norm_ops.rms_rstd
    norm_ops.rms_rstd = lambda *a: calls.append(1) or real(*a)
    try:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        norm_ops.rms_rstd = real
    assert calls and torch.equal(loss.detach(), ref)  # fused in the first pass and in the recompute
    disable_activation_checkpointing(model)
    for m in model.modules():  # HF's MLP forwards: they take the norm's output
        if type(m).__name__ == "LlamaMLP":
            m.__dict__.pop("forward")
            m.__dict__.pop("_hf_fp8_fused")
    norm_ops.ENABLED = False  # the reference: every norm on its own
    try:
        unfused = model(input_ids=ids, labels=ids).loss
    finally:
        norm_ops.ENABLED = True
    # HF's SwiGLU (silu rounded to BF16 first) against the fused kernel: close, not equal
    assert torch.equal(model(input_ids=ids, labels=ids).loss, unfused)
    assert abs(unfused.item() - ref.item()) < 0.01 * ref.item()
    assert patch_fused_ops(model) == model.config.num_hidden_layers  # the MLPs again
