"""The input embedding's one-pass weight gradient (hf_fp8.kernels.embedding, hf_fp8.embedding_ops)."""

from __future__ import annotations

import conftest
import pytest
import torch
import torch.nn.functional as F

from hf_fp8.kernels.embedding_reference import embedding_backward_reference

needs_interpreter = pytest.mark.skipif(not conftest.INTERPRETER_PATCHED, reason="needs TRITON_INTERPRET=1")


def _float64_grad(grad, ids, V, padding_idx):
    w = torch.zeros(V, grad.shape[-1], dtype=torch.float64, requires_grad=True)
    F.embedding(ids, w, padding_idx=padding_idx).backward(grad.double())
    return w.grad


def _inputs(V=37, H=48, shape=(2, 25), dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, shape, generator=g)
    ids[0, :4] = 5  # one id many times, one id never (V > tokens / 2 leaves some out)
    grad = torch.randn(*shape, H, generator=g).to(dtype)
    return grad, ids


@pytest.mark.parametrize("padding_idx", [None, 5, 0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_matches_float64(padding_idx, dtype):
    # FP32 sums of at most ~8 rows of O(1) values (error ~1e-6 relative), rounded once to the
    # output dtype: within half a unit in the last place of it (BF16: 2**-9 relative) of the exact sum
    grad, ids = _inputs(dtype=dtype)
    got = embedding_backward_reference(grad, ids, 37, padding_idx)
    want = _float64_grad(grad, ids, 37, padding_idx)
    rtol = 2**-8 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-6)
    assert got.dtype == dtype and got.shape == (37, 48)
    if padding_idx is not None:
        assert (got[padding_idx] == 0).all()
    unused = torch.ones(37, dtype=torch.bool)
    unused[ids.flatten()] = False
    assert unused.any() and (got[unused] == 0).all()


@needs_interpreter
@pytest.mark.parametrize("padding_idx", [None, 5, 36])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_reference_bit_for_bit(padding_idx, dtype):
    """Same FP32 sums in the same (token) order, one rounding: the same bits."""
    from hf_fp8.kernels.embedding import embedding_backward

    grad, ids = _inputs(dtype=dtype, seed=1)
    ids[1, -1] = 36
    got = embedding_backward(grad, ids, 37, padding_idx)
    assert torch.equal(got, embedding_backward_reference(grad, ids, 37, padding_idx))
    # a non-contiguous gradient (a column slice) reads the same rows
    wide = torch.randn(*grad.shape[:-1], 64).to(dtype)
    wide[..., 8:56] = grad
    assert torch.equal(embedding_backward(wide[..., 8:56], ids, 37, padding_idx), got)


@needs_interpreter
def test_kernel_rejects_mismatched_ids():
    from hf_fp8.kernels.embedding import embedding_backward

    grad, ids = _inputs()
    with pytest.raises(ValueError, match="ids"):
        embedding_backward(grad, ids[:, :-1], 37)


@needs_interpreter
def test_patched_llama_embedding_gradient(monkeypatch):
    """In a converted Llama the embedding's gradient comes from the kernel (the Triton backend
    forced, as on a GPU) and matches torch's own backward within one BF16 rounding."""
    from llama_fixtures import tiny_llama

    import hf_fp8
    from hf_fp8 import embedding_ops

    model = tiny_llama().to(torch.bfloat16)
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe=None))
    emb = model.get_input_embeddings()
    assert getattr(emb, "_hf_fp8_fused", False)
    ids = torch.randint(0, 512, (2, 16))
    calls = []
    real = embedding_ops.embedding_weight_grad
    monkeypatch.setattr(embedding_ops, "embedding_weight_grad", lambda *a: calls.append(1) or real(*a))
    with hf_fp8.kernel_backend("triton"):
        model(input_ids=ids, labels=ids).loss.backward()
    ours = emb.weight.grad.clone()
    assert calls == [1]
    model.zero_grad(set_to_none=True)
    embedding_ops.ENABLED = False
    try:
        with hf_fp8.kernel_backend("triton"):
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        embedding_ops.ENABLED = True
    torch.testing.assert_close(ours.float(), emb.weight.grad.float(), rtol=2**-7, atol=1e-6)
    # rows of ids absent from the batch are exactly zero
    absent = torch.ones(512, dtype=torch.bool)
    absent[ids.flatten()] = False
    assert (ours[absent] == 0).all()


def test_not_applied_where_torch_must_decide():
    """max_norm, scale_grad_by_freq, sparse gradients, a frozen weight or no grad mode: torch's forward."""
    from hf_fp8 import embedding_ops

    ids = torch.tensor([[1, 2]])
    with hf_fp8_backend("triton"):
        assert embedding_ops.embedding_fusable(torch.nn.Embedding(8, 4), ids)
        assert not embedding_ops.embedding_fusable(torch.nn.Embedding(8, 4, max_norm=1.0), ids)
        assert not embedding_ops.embedding_fusable(torch.nn.Embedding(8, 4, scale_grad_by_freq=True), ids)
        assert not embedding_ops.embedding_fusable(torch.nn.Embedding(8, 4, sparse=True), ids)
        assert not embedding_ops.embedding_fusable(torch.nn.Embedding(8, 4).requires_grad_(False), ids)
        with torch.no_grad():
            assert not embedding_ops.embedding_fusable(torch.nn.Embedding(8, 4), ids)
    # on a CPU without the Triton backend forced: torch's backward
    assert not embedding_ops.embedding_fusable(torch.nn.Embedding(8, 4), ids)


def hf_fp8_backend(name):
    import hf_fp8

    return hf_fp8.kernel_backend(name)
