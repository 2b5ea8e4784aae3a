"""hf_fp8.fp8_coverage: per FP8 layer, forwards, recomputed forwards and backwards since the last
reset, and per attention module the FP8 kernel or the fallback's reason; the Trainer logs it after
its first step."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from llama_fixtures import enable_activation_checkpointing, tiny_llama
from transformers import DataCollatorWithFlattening

import hf_fp8
from hf_fp8.integrations import attention as A


def _model(**kw):
    model = tiny_llama(seed=2, **kw)
    hf_fp8.convert(model, hf_fp8.Fp8Config(auto_filter=False))
    model.train()
    return model


def _step(model, **inputs):
    ids = inputs.pop("input_ids", torch.randint(1, 512, (2, 16)))
    model(input_ids=ids, labels=ids, **inputs).loss.backward()


def test_a_step_runs_every_layer_forward_and_backward_in_fp8():
    model = _model()
    _step(model)
    cov = hf_fp8.fp8_coverage(model, reset=True)
    assert len(cov.layers) == 14 and set(cov.layers.values()) == {(1, 0, 1)}
    assert cov.summary() == "FP8 layers: 14/14 ran their forward in FP8, 14/14 their backward"
    assert set(hf_fp8.fp8_coverage(model).layers.values()) == {(0, 0, 0)}  # reset


def test_evaluation_counts_nothing():
    model = _model()
    with torch.no_grad():
        model(input_ids=torch.randint(1, 512, (2, 16)))
    cov = hf_fp8.fp8_coverage(model)
    assert len(cov.idle_layers) == 14


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_shows_the_recomputed_forward_in_fp8(reentrant):
    model = _model()
    enable_activation_checkpointing(model, reentrant)
    _step(model)
    cov = hf_fp8.fp8_coverage(model)
    assert set(cov.layers.values()) == {(1, 1, 1)}
    assert "14/14 their recomputed forward" in cov.summary()


def test_fp8_attention_counts_the_kernel_and_names_each_fallback():
    model = tiny_llama(seed=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=2)  # head_dim 64
    hf_fp8.convert(model, hf_fp8.Fp8Config(auto_filter=False, fp8_attention=True))
    model.train()
    _step(model)  # no mask: the FP8 kernel
    cov = hf_fp8.fp8_coverage(model, reset=True)
    assert set(map(frozenset, (s.items() for s in cov.attention.values()))) == {frozenset({("fp8", 1)})}
    assert "FP8 attention: 2/2 modules ran the FP8 kernel" in cov.summary()

    ids = torch.randint(1, 512, (2, 16))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # padding: the FP8 kernel takes the mask, no fallback
        _step(model, input_ids=ids, attention_mask=mask)
    cov = hf_fp8.fp8_coverage(model, reset=True)
    assert set(map(frozenset, (s.items() for s in cov.attention.values()))) == {frozenset({("fp8", 1)})}

    # packed sequences with an explicit block-diagonal mask (what HF builds from packed position_ids):
    # contiguous key ranges, the FP8 kernel; a mask with holes falls back, the reason named
    batch = DataCollatorWithFlattening()([{"input_ids": s} for s in ([3, 4, 5, 6], [7, 8, 9])])
    block = torch.block_diag(torch.ones(4, 4), torch.ones(3, 3)).bool().tril()[None, None]
    model.model(input_ids=batch["input_ids"], attention_mask=block).last_hidden_state.sum().backward()
    cov = hf_fp8.fp8_coverage(model, reset=True)
    assert set(map(frozenset, (s.items() for s in cov.attention.values()))) == {frozenset({("fp8", 1)})}
    holes = block.clone()
    holes[..., 3, 1] = False
    with warnings.catch_warnings():  # the fallback warns once per reason and process
        warnings.simplefilter("ignore")
        model.model(input_ids=batch["input_ids"], attention_mask=holes).last_hidden_state.sum().backward()
    cov = hf_fp8.fp8_coverage(model)
    assert all(set(seen) == {A._MASK_REASON} for seen in cov.attention.values()), cov.attention
    assert "FP8 attention: 0/2 modules ran the FP8 kernel (fell back for:" in cov.summary()


class _Data(torch.utils.data.Dataset):
    """Eight random 16-token sequences for the Trainer tests."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        ids = torch.randint(1, 512, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def test_trainer_logs_the_coverage_after_its_first_step(tmp_path, caplog):
    args = hf_fp8.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none", use_cpu=True,
        disable_tqdm=True, fp8="delayed", fp8_auto_filter=False,
    )  # fmt: skip
    trainer = hf_fp8.Trainer(model=tiny_llama(seed=2), args=args, train_dataset=_Data())
    with caplog.at_level(logging.WARNING, logger="hf_fp8"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if "step 1:" in r.getMessage()]
    assert lines == ["hf_fp8, step 1: FP8 layers: 14/14 ran their forward in FP8, 14/14 their backward"]


def test_trainer_says_what_selective_recompute_chose_after_its_second_step(tmp_path, caplog):
    args = hf_fp8.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none", use_cpu=True,
        disable_tqdm=True, fp8="delayed", fp8_auto_filter=False, gradient_checkpointing=True,
    )  # fmt: skip
    trainer = hf_fp8.Trainer(model=tiny_llama(seed=2), args=args, train_dataset=_Data())
    with caplog.at_level(logging.WARNING, logger="hf_fp8"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if "step 2:" in r.getMessage()]
    # on a CPU nothing is kept, and the line says why
    assert lines == [
        "hf_fp8, step 2: activation checkpointing: 0/2 layers kept their activations, 2 recomputed "
        "(the cpu allocator's memory cannot be read)"
    ]


def test_compiled_steps_are_counted_too():
    """Under torch.compile the FP8 layers run as custom ops, whose bodies count at every call."""
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    hf_fp8.convert(net, hf_fp8.Fp8Config(auto_filter=False))
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        compiled(torch.randn(16, 64)).square().mean().backward()
    assert set(hf_fp8.fp8_coverage(net).layers.values()) == {(2, 0, 2)}
