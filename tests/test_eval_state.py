"""Evaluation and generation change no training state, and FP8 inference does not depend on the
context where the recipe allows it (per-row scales, or delayed scaling's stored scales)."""

from __future__ import annotations

import conftest
import pytest
import torch
from helpers import assert_bits_equal
from llama_fixtures import bigram_batches, sgd_steps, tiny_llama

import hf_fp8


def _fp8_buffers(model) -> dict[str, torch.Tensor]:
    """Every buffer of every FP8 layer (amax histories, scales, non-finite flags), copied."""
    return {
        f"{name}.{b}": t.detach().clone()
        for name, m in model.named_modules()
        if isinstance(m, hf_fp8.Fp8Linear)
        for b, t in m.named_buffers(recurse=False)
    }


def _assert_same_buffers(before, after):
    assert before.keys() == after.keys()
    for k in before:
        assert_bits_equal(after[k], before[k], k)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        self.ids = next(bigram_batches(n, 32, 512, seed=seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "rowwise"])
def test_three_evaluations_leave_every_fp8_buffer_bit_identical(tmp_path, recipe):
    model = tiny_llama(seed=3)
    args = hf_fp8.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=3e-3, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        fp8=recipe, fp8_auto_filter=False, fp8_exclude=["lm_head"],
    )  # fmt: skip
    trainer = hf_fp8.Trainer(model=model, args=args, train_dataset=_Data(12, 0), eval_dataset=_Data(8, 1))
    trainer.train()
    before = _fp8_buffers(model)
    assert before, "no FP8 layer: the test would prove nothing"
    if recipe == "delayed":  # seeded by training: evaluation casts with the stored scales
        assert all(bool((t != 0).any()) for k, t in before.items() if k.endswith("fp8_amax_history"))
    losses = [trainer.evaluate()["eval_loss"] for _ in range(3)]
    assert losses[0] == losses[1] == losses[2]
    _assert_same_buffers(before, _fp8_buffers(model))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_grad_forwards_neither_seed_nor_update_delayed_state(backend):
    """The fused RMSNorm/SwiGLU casts included (BF16 model), with the kernels' torch references and
    the Triton kernels (CPU interpreter)."""
    if backend == "triton" and not conftest.INTERPRETER_PATCHED:
        pytest.skip("needs TRITON_INTERPRET=1")
    model = tiny_llama(seed=4, num_hidden_layers=1).to(torch.bfloat16)
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="delayed", auto_filter=False, exclude=("lm_head",)))
    ids = next(bigram_batches(2, 16, 512, seed=2))
    fresh = _fp8_buffers(model)
    with hf_fp8.kernel_backend(backend):
        with torch.no_grad():
            model(input_ids=ids)
        _assert_same_buffers(fresh, _fp8_buffers(model))  # nothing seeded, nothing recorded
        model(input_ids=ids, labels=ids).loss.backward()  # a training step seeds and records
        before = _fp8_buffers(model)
        assert any(bool((t != 0).any()) for k, t in before.items() if k.endswith("fp8_amax_history"))
        with torch.no_grad():
            first = model(input_ids=ids).logits
            again = model(input_ids=ids).logits
    assert_bits_equal(again, first, "logits of two evaluations")
    _assert_same_buffers(before, _fp8_buffers(model))


def test_evaluations_in_between_do_not_change_training():
    """Training with a no-grad forward after every step gives the same losses and state, bit for
    bit, as training without them (the delayed recipe, whose state evaluation used to advance)."""

    def run(evaluate: bool):
        model = tiny_llama(seed=5).to(torch.bfloat16)
        hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="delayed", auto_filter=False, exclude=("lm_head",)))
        probe = next(bigram_batches(3, 24, 512, seed=8)) * 0 + 11  # a different input, all one token

        def evaluation(model):
            model.eval()
            with torch.no_grad():
                model(input_ids=probe, labels=probe)
            model.train()

        losses = sgd_steps(model, bigram_batches(2, 16, 512, seed=7), 4, after_step=evaluation if evaluate else None)
        return losses, _fp8_buffers(model)

    plain_losses, plain_state = run(False)
    eval_losses, eval_state = run(True)
    assert eval_losses == plain_losses
    _assert_same_buffers(plain_state, eval_state)


def _generate(model, prompts, *, use_cache: bool, left_pad_batch: bool) -> list[list[int]]:
    new = 6
    if not left_pad_batch:
        outs = []
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, max_new_tokens=new, do_sample=False, use_cache=use_cache, pad_token_id=0)
            outs.append(out[0, len(p) :].tolist())
        return outs
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_cache=use_cache, pad_token_id=0
    )
    return [row[width:].tolist() for row in out]


@pytest.mark.parametrize("recipe", ["delayed", "rowwise"])
def test_greedy_generation_does_not_depend_on_cache_or_batch(recipe):
    """Rowwise scales each token's activations by itself; delayed scaling casts with the stored
    scales in forwards without grad: neither sees the other tokens of the batch or of the prompt,
    so greedy decoding gives the same tokens with or without a KV cache, alone or in a left-padded
    batch (tensorwise scales by the whole tensor's amax and cannot promise this)."""
    torch.manual_seed(0)
    model = tiny_llama(seed=9)
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe=recipe, auto_filter=False, exclude=("lm_head",)))
    ids = next(bigram_batches(2, 16, 512, seed=2))
    model(input_ids=ids, labels=ids).loss.backward()  # seeds the delayed state
    model.zero_grad()
    model.eval()
    before = _fp8_buffers(model)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (5, 9, 3, 12, 7, 4, 10, 6)]
    single_cached = _generate(model, prompts, use_cache=True, left_pad_batch=False)
    single_uncached = _generate(model, prompts, use_cache=False, left_pad_batch=False)
    batch_cached = _generate(model, prompts, use_cache=True, left_pad_batch=True)
    assert single_cached == single_uncached
    assert batch_cached == single_cached
    _assert_same_buffers(before, _fp8_buffers(model))


def test_compiled_forward_without_grad_changes_no_state():
    """Under torch.compile the FP8 layers run as a custom op, inside which grad is always off: the
    op is told whether grad was on at the call."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    hf_fp8.convert(net, hf_fp8.Fp8Config(recipe="delayed", auto_filter=False, amax_history_len=4))
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    x = torch.randn(16, 64)
    compiled(x).square().mean().backward()  # seeds and records
    before = _fp8_buffers(net)
    with torch.no_grad():
        outs = [compiled(x * 3) for _ in range(2)]
    assert_bits_equal(outs[1], outs[0], "two compiled evaluations")
    _assert_same_buffers(before, _fp8_buffers(net))
    compiled(x).square().mean().backward()  # a training forward still records
    after = _fp8_buffers(net)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.endswith("fp8_amax_history"))
