"""hf_fp8.convert / revert: in-place swaps that keep Parameters, the filter, and the report."""

from __future__ import annotations

import pytest
import torch
from llama_fixtures import llama3_8b_config_on_meta, tiny_llama
from torch import nn

import hf_fp8


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4096, 14336, bias=False)
        self.down = nn.Linear(14336, 4096, bias=False)
        self.small = nn.Linear(64, 64)
        self.odd = nn.Linear(4096, 4100)


def _meta_model(n=2):
    with torch.device("meta"):
        return nn.ModuleDict({"layers": nn.ModuleList([_Block() for _ in range(n)]), "lm_head": nn.Linear(4096, 32000)})


@pytest.mark.smoke
def test_keeps_parameter_objects_and_reverts():
    model = tiny_llama()
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = set(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before conversion
    report = hf_fp8.convert(model, hf_fp8.Fp8Config(auto_filter=False, include=("model.*", "lm_head")))
    # 7 projections x 2 layers, and lm_head because an include pattern names it
    assert len(report.converted) == 15 and report["lm_head"].converted
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert isinstance(model.model.layers[0].mlp.down_proj, hf_fp8.Fp8Linear)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    ids = torch.randint(0, 512, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(before, model.model.layers[0].mlp.down_proj.weight)  # the optimizer still reaches it
    assert hf_fp8.revert(model) == 15
    assert not any(isinstance(m, hf_fp8.Fp8Linear) for m in model.modules())
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert set(model.state_dict()) == keys_before  # no hf_fp8 keys left behind


def test_lm_head_stays_in_high_precision_unless_include_names_it():
    """auto_filter=False drops the size rule only: the output embedding stays in high precision
    (what the README promises) unless an include pattern names it ('*' names nothing in particular)."""
    for cfg in (hf_fp8.Fp8Config(), hf_fp8.Fp8Config(auto_filter=False), hf_fp8.Fp8Config(include=("*",))):
        report = hf_fp8.convert(tiny_llama(), cfg)
        assert report["lm_head"].reason.startswith("output embedding") and not report["lm_head"].converted
        assert cfg.auto_filter or len(report.converted) == 14
    report = hf_fp8.convert(tiny_llama(), hf_fp8.Fp8Config(auto_filter=False, include=("*lm_head", "model.*")))
    assert report["lm_head"].converted and len(report.converted) == 15


def test_auto_filter_on_llama3_8b_shapes():
    """Llama-3-8B layer shapes on the meta device. Delayed (in-model thresholds): every decoder
    linear (q/o at 16.8M pay in this model; k and v, 4.2M, follow q, whose input they share);
    tensorwise and rowwise (per-layer thresholds): the MLPs only. The lm_head stays."""
    from transformers import LlamaForCausalLM

    mlp = {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    attention = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    expected = {"delayed": mlp | attention, "tensorwise": mlp, "rowwise": mlp}
    for recipe, conv in expected.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(llama3_8b_config_on_meta(2))
        report = hf_fp8.convert(model, recipe)
        assert set(report.converted) == conv, recipe
        assert f"{len(conv)} of 15 linear layers converted" in str(report)
        if recipe != "delayed":
            assert "too small for FP8" in report["model.layers.0.self_attn.k_proj"].reason


def test_auto_filter_on_llama_1b_shapes_converts_nothing():
    """Llama-3.2-1B-like shapes (hidden 2048, MLP 8192): no layer pays in that model (its fastest
    step had no FP8 layer, for both recipes), so nothing is converted, and the reasons are clean."""
    from llama_fixtures import tiny_llama_config
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(hidden_size=2048, intermediate_size=8192, num_hidden_layers=1, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256)  # fmt: skip
    for recipe in ("tensorwise", "delayed"):
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        report = hf_fp8.convert(model, recipe)
        assert report.converted == []
        reason = report["model.layers.0.self_attn.k_proj"].reason
        assert "too small for FP8" in reason and not reason.startswith("\0")


def test_auto_filter_for_graph_replayed_steps_on_llama_1b_shapes_converts_every_decoder_linear():
    """With steps replayed as CUDA graphs (Fp8Config(cuda_graph=True)) every decoder linear of the
    1B shapes was fastest in FP8 for both per-tensor recipes: all seven per layer, lm_head kept.
    Rowwise was not measured graphed and keeps its eager thresholds (here: nothing)."""
    from llama_fixtures import tiny_llama_config
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(hidden_size=2048, intermediate_size=8192, num_hidden_layers=1, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256)  # fmt: skip
    for recipe, n in (("tensorwise", 7), ("delayed", 7), ("rowwise", 0)):
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        report = hf_fp8.convert(model, hf_fp8.Fp8Config(recipe=recipe, cuda_graph=True))
        assert len(report.converted) == n, (recipe, report.converted)
        assert "lm_head" not in report.converted
    assert "CUDA-graph" not in report["model.layers.0.mlp.down_proj"].reason  # rowwise: eager thresholds


def test_input_sharing_siblings_follow_only_past_the_other_vetoes():
    """A k/v kept by a pattern or by module_filter_fn stays kept even when q is converted."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama3_8b_config_on_meta(1))
    report = hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="delayed", exclude=("*.v_proj",)))
    assert report["model.layers.0.self_attn.k_proj"].converted
    assert report["model.layers.0.self_attn.v_proj"].reason.startswith("excluded by pattern")
    with torch.device("meta"):
        model = LlamaForCausalLM(llama3_8b_config_on_meta(1))
    report = hf_fp8.convert(model, "delayed", module_filter_fn=lambda m, name: not name.endswith("k_proj"))
    assert not report["model.layers.0.self_attn.k_proj"].converted
    assert report["model.layers.0.self_attn.k_proj"].reason == "rejected by module_filter_fn"
    assert report["model.layers.0.self_attn.v_proj"].converted


def test_filter_rules_and_reasons():
    model = _meta_model()
    report = hf_fp8.convert(model, hf_fp8.Fp8Config(exclude=("layers.1.*",)))
    assert report.converted == ["layers.0.up", "layers.0.down"]
    assert report["layers.1.up"].reason == "excluded by pattern 'layers.1.*'"
    assert "multiples of 16" in report["layers.0.odd"].reason
    assert "too small" in report["layers.0.small"].reason
    assert report["lm_head"].reason.startswith("output embedding")

    model = _meta_model()
    report = hf_fp8.convert(model, hf_fp8.Fp8Config(include=("*.down",)))
    assert report.converted == ["layers.0.down", "layers.1.down"]
    assert report["layers.0.up"].reason == "not matched by the include patterns"

    model = _meta_model()
    report = hf_fp8.convert(model, hf_fp8.Fp8Config(auto_filter=False), module_filter_fn=lambda m, n: "1" not in n)
    assert report["layers.1.up"].reason == "rejected by module_filter_fn"
    assert report["layers.0.small"].converted  # the user asked for it
    assert not report["lm_head"].converted  # the accuracy rule holds unless include names it
    assert not report["layers.0.odd"].converted  # the hardware rule always holds


def test_tied_weights_and_subclasses_are_kept():
    class MyLinear(nn.Linear):
        pass

    emb = nn.Embedding(64, 64)
    head = nn.Linear(64, 64, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head, "custom": MyLinear(64, 64)})
    report = hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="rowwise"))
    assert report["head"].reason.startswith("weight tied to an embedding")
    assert "subclass" in report["custom"].reason


def test_convert_is_idempotent_and_validates_arguments():
    model = _meta_model(1)
    hf_fp8.convert(model)
    again = hf_fp8.convert(model)
    assert again["layers.0.up"].reason == "already Fp8Linear"
    assert sum(isinstance(m, hf_fp8.Fp8Linear) for m in model.modules()) == 2
    with pytest.raises(ValueError, match="from_linear"):
        hf_fp8.convert(nn.Linear(16, 16))
    with pytest.raises(TypeError, match="Fp8Config or a recipe name"):
        hf_fp8.convert(model, 3)
    with pytest.raises(TypeError, match="nn.Module"):
        hf_fp8.convert("model")
    with pytest.raises(ValueError, match="allowed values are 'tensorwise', 'rowwise', 'delayed'"):
        hf_fp8.convert(model, "fp4")


def test_report_is_readable_and_serializable():
    report = hf_fp8.convert(_meta_model(3), "tensorwise")
    text = report.table()
    lines = text.splitlines()
    assert lines[0].split() == ["module", "shape", "status", "reason"]
    assert any(line.startswith("layers.{0-2}.up") and "fp8" in line for line in lines)
    assert "6 of 13 linear layers converted to FP8 (ten:e4m3/e5m2)" in lines[-3]
    assert lines[-2] == "RoPE: not patched (not a supported HF model family)"
    assert lines[-1] == "logits and loss: not patched (not a supported HF causal LM)"
    d = report.to_dict()
    assert d["config"] == "ten:e4m3/e5m2" and len(d["modules"]) == 13
    assert repr(report) == "ConversionReport(converted=6, kept=7, config='ten:e4m3/e5m2')"
    with pytest.raises(KeyError, match="no linear layer named"):
        report["nope"]
    # print(report): the count, one line per reason group, RoPE, loss; no line over 100 characters
    summary = str(report).splitlines()
    assert summary[0] == "6 of 13 linear layers converted to FP8 (ten:e4m3/e5m2)"
    groups = [line for line in summary if line.startswith(("  fp8", "  kept"))]
    reasons = {line.split(None, 2)[2].split(":")[0] for line in groups if line.startswith("  kept")}
    assert len(groups) == 1 + len(reasons) and all(len(line) <= 100 for line in summary)
    assert any(line.startswith("  fp8 ") and "layers.{0-2}.{up,down}" in line for line in groups)


def test_docstring_examples_run():
    import doctest
    import importlib

    for mod in (importlib.import_module("hf_fp8.config"), importlib.import_module("hf_fp8.convert")):
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, mod.__name__


def test_report_groups_only_single_index_names():
    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(64, 64)

    with torch.device("meta"):
        model = nn.ModuleDict({"blocks": nn.ModuleList([nn.ModuleList([Expert(), Expert()]) for _ in range(2)])})
    table = hf_fp8.convert(model).table()
    assert "blocks.1.0.w" in table and "blocks.0.1.w" in table  # two indices: listed one by one
