"""Selective recompute under activation checkpointing (Fp8Config.keep_activations): kept layers
compute exactly what their recompute would (bit for bit), and "auto" keeps layers only where the
gradients still to come leave room, never when that bound does not hold."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from llama_fixtures import bigram_batches, enable_activation_checkpointing, sgd_steps, tiny_family, tiny_llama

import hf_fp8
import hf_fp8.recompute as recompute


def _bf16_llama(layers: int = 4, **overrides):
    with hf_fp8.set_default_dtype(torch.bfloat16):  # BF16: the fused RMSNorm + cast path runs
        return tiny_llama(seed=3, attn_implementation="sdpa", num_hidden_layers=layers, **overrides)


def _recomputes_per_layer(model) -> list[int]:
    """How many recomputed forwards each decoder layer's FP8 layers ran (one number per layer)."""
    counts = {}
    for name, (_, r, _) in hf_fp8.fp8_coverage(model).layers.items():
        counts.setdefault(int(name.split(".")[2]), set()).add(r)
    assert all(len(c) == 1 for c in counts.values()), counts
    return [counts[i].pop() for i in sorted(counts)]


def _train(model, steps=4):
    model.train()
    losses = sgd_steps(model, bigram_batches(2, 32, 512, seed=1), steps)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "rowwise"])
def test_kept_layers_train_bit_exactly_like_recomputed_ones(recipe, reentrant):
    plain = _bf16_llama()
    hf_fp8.convert(plain, hf_fp8.Fp8Config(recipe=recipe, auto_filter=False, amax_history_len=4, keep_activations=0))
    runs = {}
    for keep in (0, 2, 4):
        model = copy.deepcopy(plain)
        hf_fp8.convert(
            model, hf_fp8.Fp8Config(recipe=recipe, auto_filter=False, amax_history_len=4, keep_activations=keep)
        )
        enable_activation_checkpointing(model, reentrant)
        runs[keep] = _train(model)
        # the last `keep` layers ran no recompute, the others one per step: the plan did act
        assert _recomputes_per_layer(model) == [4] * (4 - keep) + [0] * keep
        plans = recompute.recompute_plans(model)
        assert [(p.last_kept, p.last_checkpointed) for p in plans] == ([(keep, 4)] if keep else [])
    runs["none"] = _train(plain)  # no checkpointing at all
    for keep, (losses, params) in runs.items():
        assert losses == runs[0][0], keep
        for name, p in params.items():
            assert torch.equal(p, runs[0][1][name]), (keep, name)


def test_full_bf16_mode_keeps_layers_too():
    model = _bf16_llama(layers=3)
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe=None, keep_activations=1))
    ref = copy.deepcopy(model)
    hf_fp8.convert(ref, hf_fp8.Fp8Config(recipe=None, keep_activations=0))
    for m in (model, ref):
        enable_activation_checkpointing(m, False)
    assert _train(model)[0] == _train(ref)[0]
    assert recompute.recompute_plans(model)[0].last_kept == 1
    assert recompute.recompute_plans(ref) == []  # keep_activations=0 removes the plan


def _checkpointed(layers: int, keep="auto"):
    """A tiny BF16 Llama, tensorwise FP8 in every decoder linear, HF checkpointing (non-reentrant)."""
    model = _bf16_llama(layers=layers)
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="tensorwise", auto_filter=False, keep_activations=keep))
    enable_activation_checkpointing(model, False)
    return model


class _FakeAllocator:
    """Stands in for the CUDA allocator's counter on the CPU: every read returns ``step`` bytes more
    than the last, so each measurement sees ``step`` bytes (less the layer's output)."""

    def __init__(self, step: int) -> None:
        self.value, self.step = 0, step

    def __call__(self, device):
        self.value += self.step
        return self.value


def _layer_grad_bytes(model) -> tuple[int, int]:
    sizes = [
        sum(p.numel() * p.element_size() for p in layer.parameters() if p.requires_grad) for layer in model.model.layers
    ]
    return sum(sizes), max(sizes)


def test_auto_measures_in_the_first_backward_then_keeps_what_the_gradients_to_come_leave_room_for(monkeypatch):
    model = _checkpointed(layers=6)  # keep_activations="auto"
    total, largest = _layer_grad_bytes(model)
    elements = 2 * 32 * model.config.hidden_size  # B=2, S=32 hidden states
    out_bytes = elements * 2
    # a layer's activations measured at a fifth of the budget: 5 of the 6 layers fit
    per_layer = (total - largest) // 5
    monkeypatch.setattr(recompute, "_allocated_bytes", _FakeAllocator(per_layer))
    plan = recompute.recompute_plans(model)[0]
    model.train()
    batches = bigram_batches(2, 32, 512, seed=1)
    sgd_steps(model, batches, 1)
    assert plan.last_kept == 0 and "not measured" in plan.last_reason  # the first step recomputes every layer...
    assert plan.measured_elements == elements  # ...and measures them
    # less the layer's output where the recompute produced it (a non-reentrant recompute stops early)
    assert per_layer - out_bytes <= plan.bytes_per_element * elements <= per_layer
    sgd_steps(model, batches, 1)
    assert plan.last_kept == 5, plan.last_reason
    assert "fit in" in hf_fp8.fp8_coverage(model).summary()


def _measured_plan(model, monkeypatch, per_layer_fraction=0.1):
    """A plan that has measured its layers at ``per_layer_fraction`` of the gradient budget."""
    total, largest = _layer_grad_bytes(model)
    monkeypatch.setattr(recompute, "_allocated_bytes", lambda device: 0)
    plan = recompute.recompute_plans(model)[0]
    plan.observe(int((total - largest) * per_layer_fraction), 2 * 32 * model.config.hidden_size)
    return plan


def test_auto_keeps_nothing_while_gradients_exist_at_the_forward(monkeypatch):
    """Gradient accumulation (or an update deferred to the next forward): the gradients the budget
    counts on already take their memory."""
    model = _checkpointed(layers=4)
    plan = _measured_plan(model, monkeypatch)
    model.train()
    ids = next(bigram_batches(2, 32, 512, seed=1))
    model(input_ids=ids, labels=ids).loss.backward()
    assert plan.last_kept == 4  # no gradient yet: every layer fits at a tenth of the budget each
    model(input_ids=ids, labels=ids).loss.backward()  # the second micro-batch of an accumulation
    assert plan.last_kept == 0 and "gradients exist" in plan.last_reason


def test_auto_keeps_nothing_for_frozen_layers(monkeypatch):
    """Adapter training: the base layers make no gradients, so there is no memory to borrow."""
    model = _checkpointed(layers=4)
    plan = _measured_plan(model, monkeypatch)
    for p in model.model.layers.parameters():  # frozen after conversion, as PEFT does
        p.requires_grad_(False)
    model.train()
    ids = next(bigram_batches(2, 32, 512, seed=1))
    model(input_ids=ids, labels=ids).loss.backward()
    assert plan.last_kept == 0 and "no gradient memory" in plan.last_reason


def test_auto_never_extrapolates_to_more_tokens_than_measured(monkeypatch):
    model = _checkpointed(layers=4)
    plan = _measured_plan(model, monkeypatch)
    model.train()
    longer = next(bigram_batches(2, 64, 512, seed=1))  # twice the tokens measured
    model(input_ids=longer, labels=longer).loss.backward()
    assert plan.last_kept == 0 and "not measured" in plan.last_reason


def test_auto_keeps_nothing_where_it_cannot_read_memory_or_with_several_processes(monkeypatch):
    model = _checkpointed(layers=2)
    _train(model, steps=2)  # the CPU: the allocator cannot be read
    plan = recompute.recompute_plans(model)[0]
    assert plan.last_kept == 0 and "cpu allocator" in plan.last_reason
    _measured_plan(model, monkeypatch)
    monkeypatch.setattr(recompute, "_several_processes", lambda: True)
    _train(model, steps=1)
    assert plan.last_kept == 0 and "several processes" in plan.last_reason


def test_evaluation_and_no_grad_forwards_change_nothing():
    model = _checkpointed(layers=2, keep=2)
    plan = recompute.recompute_plans(model)[0]
    ids = next(bigram_batches(2, 32, 512, seed=1))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert plan.last_checkpointed == 0 and plan.kept is None


def test_other_families_get_the_plan_and_stay_bit_exact():
    for model_type in ("mistral", "qwen2", "qwen3"):
        with hf_fp8.set_default_dtype(torch.bfloat16):
            base = tiny_family(model_type, seed=1, attn_implementation="sdpa", num_hidden_layers=3)
        ref = copy.deepcopy(base)
        hf_fp8.convert(base, hf_fp8.Fp8Config(recipe="tensorwise", auto_filter=False, keep_activations=2))
        hf_fp8.convert(ref, hf_fp8.Fp8Config(recipe="tensorwise", auto_filter=False, keep_activations=0))
        for m in (base, ref):
            enable_activation_checkpointing(m, False)
        assert _train(base, steps=2)[0] == _train(ref, steps=2)[0], model_type
        assert _recomputes_per_layer(base) == [2, 0, 0], model_type


def test_the_model_still_pickles_and_revert_restores_transformers_checkpointing(tmp_path):
    model = _checkpointed(layers=2, keep=1)
    _train(model, steps=1)
    wrapped = model.model.layers[0]._gradient_checkpointing_func
    assert isinstance(wrapped, recompute._SelectiveCheckpoint)
    torch.save(model.model.layers[0], tmp_path / "layer.pt")  # the wrapped checkpoint function pickles
    assert pickle.dumps(wrapped)
    hf_fp8.revert(model)
    assert recompute.recompute_plans(model) == []
    assert not any(isinstance(m.__dict__.get("_gradient_checkpointing_func"), recompute._SelectiveCheckpoint)
                   for m in model.modules())  # fmt: skip


@pytest.mark.parametrize("bad", [-1, True, "most", 1.5])
def test_bad_keep_activations_names_the_choices(bad):
    with pytest.raises(ValueError, match="keep_activations.*'auto'"):
        hf_fp8.Fp8Config(keep_activations=bad)


def test_keep_activations_from_text_and_json():
    assert hf_fp8.Fp8Config(keep_activations="3").keep_activations == 3
    cfg = hf_fp8.Fp8Config(keep_activations=5)
    assert hf_fp8.Fp8Config.from_json(cfg.to_json()) == cfg
