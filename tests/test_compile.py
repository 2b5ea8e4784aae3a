"""torch.compile on converted models: one graph, no breaks, the same numbers as eager.

Dynamo cannot trace the Triton launches or the FP8 layers' Python-side scaling state; the
FP8 linear, RMSNorm, SwiGLU, RoPE, loss and attention paths run as torch custom ops
(``hf_fp8::*``) when compiled. ``aot_eager`` runs the compiled graphs (AOTAutograd, custom
ops' fake and autograd registrations) without Inductor's C++ build, which CPU CI lacks.
"""

from __future__ import annotations

import copy

import conftest
import pytest
import torch
from helpers import assert_bits_equal
from llama_fixtures import tiny_llama
from torch import nn

import hf_fp8


def _train_steps(model, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 512, (2, 32), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize(
    "recipe,backend", [("tensorwise", "torch"), ("rowwise", "torch"), ("delayed", "torch"), ("delayed", "triton")]
)
def test_compiled_llama_is_one_graph_and_matches_eager(recipe, backend):
    """Eager vs torch.compile(aot_eager), two SGD steps: same losses (FP8 casts, delayed state
    and fused kernels are the same code, so bit-identical is expected), and no graph break."""
    if backend == "triton" and not conftest.INTERPRETER_PATCHED:
        pytest.skip("needs TRITON_INTERPRET=1")
    model = tiny_llama()
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe=recipe, auto_filter=False))
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 512, (2, 32))
    with hf_fp8.kernel_backend(backend):
        explanation = torch._dynamo.explain(copy.deepcopy(model))(input_ids=ids, labels=ids)
        assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
        torch._dynamo.reset()
        eager = _train_steps(model)
        compiled = _train_steps(torch.compile(twin, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        assert_bits_equal(a, b, "loss")
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_bits_equal(p, q, name)
    if recipe == "delayed":
        for m, t in zip(model.modules(), twin.modules()):
            if isinstance(m, hf_fp8.Fp8Linear):
                assert_bits_equal(m.fp8_amax_history, t.fp8_amax_history, "amax history")
    torch._dynamo.reset()


def test_compiled_shared_input_group_matches_eager():
    """Two layers sharing one input cast (one with a bias, which the compiled path adds in the graph),
    compiled with fullgraph=True: outputs and gradients as eager (bias gradient: an FP32 sum in
    another order, hence allclose)."""
    from hf_fp8.linear import shared_input_linears

    torch.manual_seed(0)
    cfg = hf_fp8.Fp8Config(recipe="tensorwise")
    layers = tuple(hf_fp8.Fp8Linear.from_linear(nn.Linear(64, 48, bias=b), cfg) for b in (False, True))
    fn = torch.compile(lambda x: shared_input_linears(layers, x), backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 16, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    eager = shared_input_linears(layers, x)
    compiled = fn(x2)
    grads = [torch.randn_like(y) for y in eager]
    torch.autograd.backward(eager, grads)
    eager_w = [m.weight.grad.clone() for m in layers]
    eager_b = layers[1].bias.grad.clone()
    for m in layers:
        m.zero_grad(set_to_none=True)
    torch.autograd.backward(compiled, grads)
    for a, b in zip(eager, compiled):
        assert_bits_equal(a, b, "output")
    assert_bits_equal(x.grad, x2.grad, "input grad")
    for w, m in zip(eager_w, layers):
        assert_bits_equal(w, m.weight.grad, "weight grad")
    torch.testing.assert_close(layers[1].bias.grad, eager_b, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schemas, fake implementations and autograd registrations agree."""
    from hf_fp8.kernels import norm_swiglu, rope

    x = torch.randn(2, 8, 32)
    w = torch.randn(32, requires_grad=True)
    for op, args in (
        (norm_swiglu._rms_norm_op, (x.requires_grad_(), w, 1e-6)),
        (norm_swiglu._swiglu_op, (torch.randn(4, 32, requires_grad=True), torch.randn(4, 32, requires_grad=True))),
        (
            rope._rope_op,
            (
                torch.randn(1, 8, 4, 16, requires_grad=True),
                torch.randn(1, 8, 2, 16, requires_grad=True),
                torch.arange(8)[None],
                1.0 / 500000.0 ** (torch.arange(0, 16, 2).float() / 16),
                1.0,
                False,
            ),
        ),
    ):
        if not conftest.INTERPRETER_PATCHED:
            pytest.skip("needs TRITON_INTERPRET=1")
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_backend_probes_are_compile_time_constants(monkeypatch):
    """The Triton/capability probes run in every layer's forward on a GPU; dynamo must take them
    as constants (find_spec inside them broke the graph 16 times on a 2-layer model on the H100)."""
    from hf_fp8 import _backend
    from hf_fp8.loss import _has_dtype_gemm

    def probe(x):
        if _backend._triton_available() and not _has_dtype_gemm():
            return x + 1
        return x - 1

    x = torch.randn(4)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(probe)(x)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]

    # the FP8-capability probe, as on a GPU machine (capability faked: this one has none)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_backend, "_FP8_CAPABLE", {})

    def gpu_probe(x):
        return x + 1 if _backend.fp8_gemm_supported(torch.device("cuda")) else x - 1

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(gpu_probe, backend="eager", fullgraph=True)(x), x + 1)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(probe)(x)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    torch.testing.assert_close(torch.compile(probe, backend="eager", fullgraph=True)(x), probe(x))
    torch._dynamo.reset()


def test_importing_hf_fp8_does_not_import_dynamo():
    """Importing torch._dynamo is slow and made gloo teardown hang in the distributed tests."""
    import subprocess
    import sys

    code = "import sys, hf_fp8, hf_fp8.linear, hf_fp8.loss; print('torch._dynamo' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_compiled_fp8_attention_gets_no_mask_and_no_graph_break():
    """FP8 attention (head_dim 64, the torch emulation on CPU) under torch.compile: a plain causal
    mask stays None, so the FP8 path runs, in one graph, as in eager. (The transformers here
    already skips the mask while compiling; 5.17 on the H100 did not, which test_gpu covers.)"""
    from hf_fp8.integrations import attention as A

    model = tiny_llama(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="tensorwise", fp8_attention=True, auto_filter=False))
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 512, (2, 32))
    before = set(A.fallback_reasons())
    explanation = torch._dynamo.explain(copy.deepcopy(model))(input_ids=ids, labels=ids)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    # the FP8 attention emulation's casts are in the graph (FP8 linears are opaque custom ops)
    assert any("float8_e4m3fn" in g.code for g in explanation.graphs)
    torch._dynamo.reset()
    eager = model(input_ids=ids, labels=ids).loss
    compiled = torch.compile(twin, backend="aot_eager")(input_ids=ids, labels=ids).loss
    assert_bits_equal(eager.detach(), compiled.detach(), "loss")
    assert A.fallback_reasons() == before  # nothing fell back
    torch._dynamo.reset()


def test_fp8_attention_mask_function_keeps_padding_masks():
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    from hf_fp8.integrations.attention import _causal_mask_or_none

    mask = _causal_mask_or_none(sdpa_mask)
    kw = dict(batch_size=2, q_length=8, kv_length=8, q_offset=0, kv_offset=0, mask_function=causal_mask_function)
    assert mask(**kw, attention_mask=None) is None
    padding = torch.ones(2, 8, dtype=torch.bool)
    padding[0, :3] = False
    padded = mask(**kw, attention_mask=padding)
    assert padded is not None and not padded[0, 0, :, :3].any()
    assert mask(**{**kw, "q_length": 1, "q_offset": 7}, attention_mask=None) is sdpa_mask(
        **{**kw, "q_length": 1, "q_offset": 7}, attention_mask=None
    )


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "delayed"])
def test_compiled_layer_with_saved_weight_transpose_matches_eager(recipe):
    torch.manual_seed(1)
    cfg = hf_fp8.Fp8Config(recipe=recipe, save_weight_transpose=True)  # the default re-casts: covered elsewhere
    layer = hf_fp8.Fp8Linear.from_linear(nn.Linear(64, 48), cfg)
    twin = copy.deepcopy(layer)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x = torch.randn(3, 16, 64, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        y, y2 = layer(x), compiled(x2)
        assert_bits_equal(y, y2, "output")
        g = torch.randn_like(y)
        y.backward(g)
        y2.backward(g)
        assert_bits_equal(x.grad, x2.grad, "input grad")
        assert_bits_equal(layer.weight.grad, twin.weight.grad, "weight grad")
    torch._dynamo.reset()
