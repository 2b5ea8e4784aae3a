"""``hf_fp8.CudaGraphStep`` on the CPU: its refusals and its delayed-scaling bookkeeping.

Capture and replay need a GPU; ``tests/test_gpu.py::test_cuda_graph_step_equals_eager_steps_on_gpu``
checks there that replayed steps equal eager ones (losses, gradients, weights, histories).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import assert_bits_equal
from llama_fixtures import tiny_llama

import hf_fp8
from hf_fp8.cuda_graph import CudaGraphStep, _restore_delayed_state, _seeded_delayed_state
from hf_fp8.state import fp8_state_dict


def _delayed_llama(**cfg):
    model = tiny_llama(seed=3).to(torch.bfloat16)
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="delayed", auto_filter=False, exclude=("lm_head",), **cfg))
    return model


def _step(model, seed: int) -> None:
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_refuses_to_run_without_a_gpu():
    model = _delayed_llama()
    ids = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        CudaGraphStep(model)(input_ids=ids, labels=ids)


def test_refuses_what_a_graph_cannot_replay():
    with pytest.raises(ValueError, match="nonfinite='raise'"):
        CudaGraphStep(_delayed_llama(nonfinite="raise"))
    with pytest.raises(ValueError, match="warmup_iters"):
        CudaGraphStep(_delayed_llama(), warmup_iters=0)


def test_warm_up_passes_leave_seeded_histories_as_they_were():
    """The capture's warm-up passes run the first batch through the model; slots whose histories
    were seeded before get them back bit for bit, so the first replay starts where an eager step
    would. Slots not yet seeded are left out (their warm-up seeds them from that same batch)."""
    fresh = _delayed_llama()
    assert _seeded_delayed_state(fresh) == []
    model = _delayed_llama()
    _step(model, 0)
    saved = _seeded_delayed_state(model)
    n_fp8 = sum(isinstance(m, hf_fp8.Fp8Linear) for m in model.modules())
    assert len(saved) == n_fp8 > 0
    assert {tuple(slots) for _, slots, _, _ in saved} == {(0, 1, 2), (1, 2)}  # k/v, up: no input cast of their own
    before = fp8_state_dict(model)
    _step(model, 1)  # a "warm-up" pass: rolls every history
    after_warmup = fp8_state_dict(model)
    assert any(not torch.equal(before[k], after_warmup[k]) for k in before)
    _restore_delayed_state(saved)
    for k, v in fp8_state_dict(model).items():
        assert_bits_equal(v, before[k], k)
    # restored, the next step gives what it gives on a model that never ran the warm-up pass
    twin = _delayed_llama()
    _step(twin, 0)
    _step(model, 2)
    _step(twin, 2)
    for (k, v), w in zip(fp8_state_dict(model).items(), fp8_state_dict(twin).values()):
        assert_bits_equal(v, w, k)


def test_capture_builds_no_mask_where_the_eager_warm_up_built_none():
    """Positions numbered by the model: transformers builds no mask in eager mode (SDPA's
    is_causal), but would build an explicit one while capturing; the capture is told what the
    warm-up saw. With an attention mask or position ids the mask depends on the data: left alone."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from hf_fp8.cuda_graph import _MaskAsInEager

    model = tiny_llama(seed=1, attn_implementation="sdpa")
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    original = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    masks = _MaskAsInEager(model, {"input_ids": ids, "labels": ids})
    with masks.recording():
        model(input_ids=ids, labels=ids)
    assert masks.eager_results and all(masks.eager_results)
    assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is original
    with masks.capturing():
        assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is not original
        assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](batch_size=2, cache_position=torch.arange(16)) is None
    assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is original

    padded = _MaskAsInEager(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert not padded.applies
    with padded.recording():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert padded.eager_results == [] and isinstance(padded.capturing(), type(contextlib.nullcontext()))
