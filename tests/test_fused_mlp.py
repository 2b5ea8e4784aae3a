"""The FP8 SwiGLU MLP as one node (``hf_fp8.mlp_ops``): the SwiGLU inside down's cast gives the
numbers of the unfused layers bit for bit, over several steps, for every recipe and both
kernel backends; anything it cannot handle takes the unfused path."""

from __future__ import annotations

import copy

import conftest
import pytest
import torch
from helpers import assert_bits_equal
from llama_fixtures import tiny_llama, train_losses
from torch import nn

import hf_fp8
from hf_fp8 import mlp_ops, norm_ops
from hf_fp8.kernels.norm_swiglu_reference import swiglu_reference
from hf_fp8.linear import shared_input_linears

RECIPES = ["tensorwise", "delayed", "rowwise"]


def _mlp(recipe, seed=0, **cfg):
    torch.manual_seed(seed)
    config = hf_fp8.Fp8Config(recipe=recipe, **cfg)
    return [
        hf_fp8.Fp8Linear.from_linear(nn.Linear(i, o, bias=False), config) for i, o in ((64, 96), (64, 96), (96, 64))
    ]


def _unfused(layers, x):
    gate, up = shared_input_linears(tuple(layers[:2]), x)
    if hf_fp8._backend.use_triton(gate):
        from hf_fp8.kernels.norm_swiglu import swiglu

        return layers[2](swiglu(gate, up))
    return layers[2](swiglu_reference(gate, up))


def _backend_ctx(backend):
    if backend == "triton" and not conftest.INTERPRETER_PATCHED:
        pytest.skip("needs TRITON_INTERPRET=1")
    # "triton" runs every kernel (SwiGLU included) under the interpreter; "torch" the references
    return hf_fp8.kernel_backend(backend)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("recompute", [True, False], ids=["recast-down-input", "saved-down-input"])
def test_fused_mlp_equals_unfused_layers(recipe, backend, recompute, monkeypatch):
    """Outputs, input and weight gradients, and delayed amax histories bit-identical over three
    steps with growing inputs (delayed: the second and third steps use history-derived scales).
    Per-tensor recipes run SwiGLU's backward inside the gradient casts, rowwise the unfused one;
    down's transposed input re-cast in the backward from gate/up, or kept from the forward."""
    monkeypatch.setattr(mlp_ops, "RECOMPUTE_DOWN_INPUT_T", recompute)
    fused = _mlp(recipe)
    twins = copy.deepcopy(fused)
    fused_backward_calls = []
    original = hf_fp8.quantize.swiglu_backward_quantize
    monkeypatch.setattr(
        hf_fp8.quantize, "swiglu_backward_quantize", lambda *a, **k: fused_backward_calls.append(1) or original(*a, **k)
    )
    with _backend_ctx(backend):
        for step in range(3):
            x = (torch.randn(2, 24, 64) * (1 + step)).to(torch.bfloat16).requires_grad_()
            x2 = x.detach().clone().requires_grad_()
            assert mlp_ops.fused_swiglu_mlp_applies(*fused, x)
            y = mlp_ops.fused_swiglu_mlp(*fused, x)
            y2 = _unfused(twins, x2)
            assert_bits_equal(y, y2, f"step {step} output")
            dy = torch.randn_like(y)
            y.backward(dy)
            y2.backward(dy)
            assert_bits_equal(x.grad, x2.grad, f"step {step} input grad")
            for name, m, t in zip(("gate", "up", "down"), fused, twins):
                assert_bits_equal(m.weight.grad, t.weight.grad, f"step {step} {name} weight grad")
                m.weight.grad = t.weight.grad = None
                if recipe == "delayed":
                    assert_bits_equal(m.fp8_amax_history, t.fp8_amax_history, f"{name} history")
                    assert_bits_equal(m.fp8_scale, t.fp8_scale, f"{name} scale")
    assert len(fused_backward_calls) == (0 if recipe == "rowwise" else 3)


@pytest.mark.parametrize("recipe", RECIPES)
def test_down_input_transpose_not_kept_for_the_backward(recipe, monkeypatch):
    """By default the only FP8 activation the node keeps is x's transposed copy (gate/up's
    weight gradients); down's (the SwiGLU output's) is re-cast from gate/up, which SwiGLU's
    backward keeps anyway. With the flag off, it is kept: one more FP8 (96 x 48) tensor."""
    x = torch.randn(2, 24, 64).to(torch.bfloat16).requires_grad_()
    saved = {}
    for recompute in (True, False):
        monkeypatch.setattr(mlp_ops, "RECOMPUTE_DOWN_INPUT_T", recompute)
        shapes = []

        def pack(t, shapes=shapes):
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mlp_ops.fused_swiglu_mlp(*_mlp(recipe), x).sum().backward()
        saved[recompute] = sorted(shapes)
    assert saved[True] == [(64, 48)]
    assert saved[False] == [(64, 48), (96, 48)]


@pytest.mark.parametrize(
    "frozen, x_grad",
    [((0, 1), False), ((2,), True), ((0, 1, 2), True), ((), False)],
    ids=["gate-up-frozen-no-input-grad", "down-frozen", "all-frozen", "weights-only"],
)
def test_fused_mlp_partial_gradients(frozen, x_grad):
    """Frozen layers and inputs without gradient: the same gradients as the unfused layers, and
    none where none is needed (saved weight transposes here, re-cast ones by default elsewhere)."""
    fused = _mlp("tensorwise", save_weight_transpose=True)
    for i in frozen:
        fused[i].weight.requires_grad_(False)
    twins = copy.deepcopy(fused)
    x = torch.randn(3, 16, 64).requires_grad_(x_grad)
    x2 = x.detach().clone().requires_grad_(x_grad)
    y, y2 = mlp_ops.fused_swiglu_mlp(*fused, x), _unfused(twins, x2)
    assert_bits_equal(y, y2, "output")
    if not y.requires_grad:
        assert not y2.requires_grad
        return
    dy = torch.randn_like(y)
    y.backward(dy)
    y2.backward(dy)
    assert (x.grad is None) == (not x_grad)
    if x_grad:
        assert_bits_equal(x.grad, x2.grad, "input grad")
    for i, (m, t) in enumerate(zip(fused, twins)):
        assert (m.weight.grad is None) == (i in frozen)
        if m.weight.grad is not None:
            assert_bits_equal(m.weight.grad, t.weight.grad, f"weight grad {i}")


def test_no_grad_and_autocast():
    fused = _mlp("delayed")
    twins = copy.deepcopy(fused)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert_bits_equal(mlp_ops.fused_swiglu_mlp(*fused, x), _unfused(twins, x), "no_grad")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y2 = mlp_ops.fused_swiglu_mlp(*fused, x), _unfused(twins, x)
    assert y.dtype == torch.bfloat16
    assert_bits_equal(y, y2, "autocast")


def test_what_takes_the_unfused_path():
    """Hooks (monitoring, PEFT's), biases, BF16 layers, mixed gate/up configs, wrong shapes, compile."""
    gate, up, down = _mlp("tensorwise")
    x = torch.randn(4, 64)
    assert mlp_ops.fused_swiglu_mlp_applies(gate, up, down, x)
    handle = down.register_forward_hook(lambda *a: None)
    assert not mlp_ops.fused_swiglu_mlp_applies(gate, up, down, x)
    handle.remove()
    with_bias = hf_fp8.Fp8Linear.from_linear(nn.Linear(96, 64))
    assert not mlp_ops.fused_swiglu_mlp_applies(gate, up, with_bias, x)
    assert not mlp_ops.fused_swiglu_mlp_applies(gate, up, nn.Linear(96, 64, bias=False), x)
    rowwise_up = hf_fp8.Fp8Linear.from_linear(nn.Linear(64, 96, bias=False), hf_fp8.Fp8Config(recipe="rowwise"))
    assert not mlp_ops.fused_swiglu_mlp_applies(gate, rowwise_up, down, x)
    assert not mlp_ops.fused_swiglu_mlp_applies(gate, up, down, torch.randn(4, 32))
    assert not mlp_ops.fused_swiglu_mlp_applies(gate, up, down, torch.randn(0, 64))


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # FP32: the backward stays unfused
def test_converted_llama_trains_identically_with_and_without_the_fused_mlp(recipe, dtype, monkeypatch):
    """A tiny Llama (every MLP layer FP8, fused ops on): the same losses and weights, bit for bit,
    whether its MLPs run as one node or as three layers, and the fused node did run."""
    base = tiny_llama(seed=4).to(dtype)
    runs = []
    for enabled in (True, False):
        model = copy.deepcopy(base)
        hf_fp8.convert(model, hf_fp8.Fp8Config(recipe=recipe, auto_filter=False, exclude=("lm_head",)))
        calls = []
        original = mlp_ops.fused_swiglu_mlp
        monkeypatch.setattr(mlp_ops, "ENABLED", enabled)
        monkeypatch.setattr(
            "hf_fp8.integrations.fused_ops.fused_swiglu_mlp",
            lambda *a, calls=calls, original=original, **k: calls.append(1) or original(*a, **k),
        )
        losses = train_losses(model, torch.optim.AdamW(model.parameters(), lr=3e-3), 3, batch=2, seq=16)
        assert bool(calls) == enabled
        runs.append((losses, model))
    (l_fused, m_fused), (l_plain, m_plain) = runs
    assert l_fused == l_plain
    for (name, p), q in zip(m_fused.named_parameters(), m_plain.parameters()):
        assert_bits_equal(p, q, name)


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_attention_projections_share_one_input_cast(recipe, monkeypatch):
    """q, k and v as one FP8 node in the patched attention, with fewer casts: the first loss of
    separate layers bit for bit (delayed: the group's input scale comes from q's history, which
    records the amaxes of the very input k and v would have recorded), and then within BF16
    rounding: the group adds the three input gradients in its own order, autograd in another,
    and BF16 addition is not associative."""
    from hf_fp8.integrations import rope

    base = tiny_llama(seed=5).to(torch.bfloat16)
    runs = []
    for grouped in (True, False):
        model = copy.deepcopy(base)
        hf_fp8.convert(model, hf_fp8.Fp8Config(recipe=recipe, auto_filter=False, exclude=("lm_head",)))
        casts = []
        original_q = (
            hf_fp8.scaling.Q.quantize_tensorwise if recipe == "tensorwise" else hf_fp8.scaling.Q.quantize_delayed
        )
        name = original_q.__name__
        monkeypatch.setattr(hf_fp8.scaling.Q, name, lambda *a, o=original_q, c=casts, **k: c.append(1) or o(*a, **k))
        # the norms run on their own (hf_fp8.norm_ops sums the q/k/v input gradients in FP32;
        # tests/test_norm_ops.py covers that), so that only the grouping differs
        monkeypatch.setattr(norm_ops, "ENABLED", False)
        if not grouped:
            monkeypatch.setattr(rope, "shared_input_linears", lambda mods, x: tuple(m(x) for m in mods))
        losses = train_losses(model, torch.optim.AdamW(model.parameters(), lr=3e-3), 3, batch=2, seq=16)
        monkeypatch.undo()
        runs.append((losses, model, len(casts)))
    (l_grouped, m_grouped, n_grouped), (l_separate, m_separate, n_separate) = runs
    assert l_grouped[0] == l_separate[0]
    # measured: 8e-4 relative after two updates at lr 3e-3 (one BF16 ulp is 4e-3 relative)
    assert l_grouped == pytest.approx(l_separate, rel=4e-3)
    assert n_grouped < n_separate, (n_grouped, n_separate)


def test_fused_mlp_with_fp8_only_frozen_weights():
    """Fp8Config(fp8_weights=True) layers (frozen FP8 codes, no weight cast): the node reads the
    codes as they are and transposes them for the input gradient, like the unfused layers."""
    fused = _mlp("tensorwise", fp8_weights=True)
    for m in fused:
        m.weight.requires_grad_(False)
        m.store_weight_in_fp8()
    twins = copy.deepcopy(fused)
    x = torch.randn(2, 24, 64).to(torch.bfloat16).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2 = mlp_ops.fused_swiglu_mlp(*fused, x), _unfused(twins, x2)
    assert_bits_equal(y, y2, "output")
    dy = torch.randn_like(y)
    y.backward(dy)
    y2.backward(dy)
    assert_bits_equal(x.grad, x2.grad, "input grad")
