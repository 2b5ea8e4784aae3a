"""The benchmark's padded-SFT batches (``bench_llama --pad-frac``): the padding fraction asked for,
masks and labels that match, and the timing loop's dict batches (tiny model, CPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import import_benchmark
from llama_fixtures import tiny_llama

padded = import_benchmark("bench_llama").padded
time_training_steps = import_benchmark("common").time_training_steps


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_padded_batches_have_the_mean_padding_asked_for(batch):
    ids = torch.randint(1, 512, (batch, 400))
    (b,) = padded([ids], 0.25)
    mask = b["attention_mask"]
    assert (1 - mask.float().mean()).item() == pytest.approx(0.25, abs=0.01)
    # right padding: every row a prefix of real tokens; pads are id 0 with label -100
    assert torch.equal(mask, mask.cummin(-1).values)
    assert torch.equal(b["input_ids"][mask == 1], ids[mask == 1]) and (b["input_ids"][mask == 0] == 0).all()
    assert torch.equal(b["labels"] == -100, mask == 0)
    with pytest.raises(ValueError, match="leaves no tokens"):
        padded([ids], 0.7 if batch > 1 else 1.0)


def test_timing_loop_takes_padded_batches_and_counts_real_tokens():
    model = tiny_llama()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = padded([torch.randint(1, 512, (2, 32)) for _ in range(3)], 0.25)
    timed = time_training_steps(model, opt, batches, warmup=1)
    assert len(timed["losses"]) == 3 and all(torch.isfinite(torch.tensor(timed["losses"])))
    real = int(batches[-1]["attention_mask"].sum())
    assert real == 48  # 2 x 32 tokens, 25% padding
    assert timed["tokens_per_s"] == pytest.approx(real / (timed["step_ms"] / 1e3))
    with pytest.raises(ValueError, match="eager step"):
        time_training_steps(model, opt, batches, warmup=0, forward_backward=lambda ids: None)


@pytest.mark.parametrize("name", ["8b", "qwen2.5-7b", "qwen3-8b", "mistral-7b"])
def test_benchmark_configs_build_their_family_and_convert_every_decoder_linear(name):
    """The benchmark's model configs (on the meta device, one layer): the family's classes, and
    every decoder linear convertible to FP8 (dimensions multiples of 16)."""
    import transformers

    import hf_fp8

    bench_llama = import_benchmark("bench_llama")
    CONFIGS, FAMILIES = bench_llama.CONFIGS, bench_llama.FAMILIES

    config = dict(CONFIGS[name], num_hidden_layers=1)
    config_cls, model_cls, _ = (getattr(transformers, n, n) for n in FAMILIES[config.pop("model_type", "llama")])
    with torch.device("meta"):
        model = model_cls(config_cls(**config))
    report = hf_fp8.convert(model, hf_fp8.Fp8Config(auto_filter=False))
    assert len(report.converted) == 7 and report.rope.startswith("FP32 rotation")
