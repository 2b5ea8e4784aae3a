"""Activation checkpointing done right for every recipe: a recomputed forward casts with the scales
its first forward used and records nothing, so the delayed histories advance once per step, and
training with checkpointing equals training without, bit for bit (CPU), the fused RMSNorm + cast
path included (BF16 model)."""

from __future__ import annotations

import copy

import pytest
import torch
from llama_fixtures import bigram_batches, enable_activation_checkpointing, sgd_steps, tiny_llama
from torch.utils.checkpoint import checkpoint

import hf_fp8


def _checkpoint_layers_by_hand(model) -> None:
    """``torch.utils.checkpoint`` around each decoder layer, the way a custom training loop does it."""
    for layer in model.model.layers:
        forward = layer.forward

        def wrapped(*args, __forward=forward, **kwargs):
            return checkpoint(__forward, *args, use_reentrant=False, **kwargs)

        layer.forward = wrapped


MODES = {
    "hf-reentrant": lambda m: enable_activation_checkpointing(m, True),
    "hf-nonreentrant": lambda m: enable_activation_checkpointing(m, False),
    "torch-checkpoint": _checkpoint_layers_by_hand,
}


def _state(model):
    return {n: b.clone() for n, b in model.named_buffers() if "fp8_amax_history" in n or "fp8_scale" in n}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "rowwise"])
def test_training_with_checkpointing_equals_training_without(recipe, mode):
    with hf_fp8.set_default_dtype(torch.bfloat16):  # BF16: the fused RMSNorm + cast path runs
        plain = tiny_llama(seed=3, attn_implementation="sdpa", num_hidden_layers=2)
    hf_fp8.convert(plain, hf_fp8.Fp8Config(recipe=recipe, auto_filter=False, amax_history_len=4))
    ckpt = copy.deepcopy(plain)
    MODES[mode](ckpt)
    runs = []
    for model in (plain, ckpt):
        model.train()
        # the first step seeds the delayed histories, the next ones use them
        losses = sgd_steps(model, bigram_batches(2, 32, 512, seed=1), 4)
        runs.append((losses, _state(model), {n: p.detach().clone() for n, p in model.named_parameters()}))
    (l_plain, s_plain, p_plain), (l_ckpt, s_ckpt, p_ckpt) = runs
    # the checkpointed run did recompute every FP8 layer (else this test would prove nothing)
    assert all(r == 4 for _, r, _ in hf_fp8.fp8_coverage(ckpt).layers.values())
    assert all(r == 0 for _, r, _ in hf_fp8.fp8_coverage(plain).layers.values())
    assert l_ckpt == l_plain
    for name in s_plain:  # histories advanced once per step, to the same amaxes
        assert torch.equal(s_ckpt[name], s_plain[name]), name
    for name in p_plain:
        assert torch.equal(p_ckpt[name], p_plain[name]), name
