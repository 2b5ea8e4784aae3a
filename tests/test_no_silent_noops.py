"""A requested feature that does nothing says so: FP8 asked for and (almost) no layer converted,
a script without --fp8, an accelerate launch with HF_FP8_RECIPE on a small model, lm_head with the
size filter off, FP8 emulated on a CPU, an optional dependency missing."""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch
from llama_fixtures import tiny_llama

import hf_fp8

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_fp8_with_no_layer_converted_warns_with_the_reason_and_the_flag():
    with pytest.warns(UserWarning, match=r"only 0 of 14 eligible linear layers are FP8.*--fp8_auto_filter false"):
        report = hf_fp8.convert(tiny_llama(), "rowwise")  # every layer below rowwise's size threshold
    assert not report.converted


def test_fp8_with_under_half_converted_warns_and_names_the_faster_recipe():
    from llama_fixtures import llama3_8b_config_on_meta
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama3_8b_config_on_meta(2))
    with pytest.warns(UserWarning, match=r"only 6 of 14 eligible.*recipe='delayed'"):
        hf_fp8.convert(model, "tensorwise")  # the MLPs only: attention is below tensorwise's threshold


def test_no_warning_when_most_layers_are_fp8_or_the_user_excluded_them():
    from llama_fixtures import llama3_8b_config_on_meta
    from transformers import LlamaForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.device("meta"):
            model = LlamaForCausalLM(llama3_8b_config_on_meta(2))
        hf_fp8.convert(model)  # delayed, the default: every decoder linear
        # excluded by the user's own patterns: not "eligible", no warning
        hf_fp8.convert(tiny_llama(), hf_fp8.Fp8Config(auto_filter=False, exclude=("*.self_attn.*",)))


def test_size_filter_off_keeps_lm_head_in_high_precision():
    report = hf_fp8.convert(tiny_llama(), hf_fp8.Fp8Config(auto_filter=False))
    assert not report["lm_head"].converted and len(report.converted) == 14


def test_finetune_script_without_fp8_uses_the_default_recipe_and_says_so(tmp_path, capsys):
    """The same script with and without --model_name_or_path: the default recipe either way
    (it used to be rowwise for the tiny model and no FP8 at all for a checkpoint, silently)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        script = importlib.import_module("finetune_trainer")
        checkpoint = tmp_path / "ckpt"
        tiny_llama(seed=1, vocab_size=512).save_pretrained(checkpoint)
        from _shared import build_tokenizer

        build_tokenizer((EXAMPLES / "data" / "public_domain.txt").read_text()).save_pretrained(checkpoint)
        script.main(
            ["--model_name_or_path", str(checkpoint), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
             "--fp8_auto_filter", "false", "--disable_tqdm", "true", "--use_cpu", "true"]
        )  # fmt: skip
        out = capsys.readouterr().out
        assert "FP8 recipe: delayed (hf_fp8's default" in out and "converted to FP8 (dly:" in out
        script.main(
            ["--output_dir", str(tmp_path / "bf16"), "--max_steps", "1", "--fp8", "none", "--disable_tqdm", "true"]
        )
        out = capsys.readouterr().out
        assert "converted to FP8" not in out and "FP8 recipe:" not in out
    finally:
        sys.path.remove(str(EXAMPLES))


def test_accelerate_recipe_from_the_environment_converts_the_tiny_model(monkeypatch, capsys):
    """README: ``HF_FP8_RECIPE=rowwise accelerate launch ... finetune_accelerate.py`` trained with 0
    FP8 layers (the size filter); HF_FP8_AUTO_FILTER=0, which the example sets for its tiny model,
    converts them."""
    from hf_fp8.integrations.accelerate_plugin import config_from_environment

    cfg = config_from_environment({"HF_FP8_RECIPE": "rowwise", "HF_FP8_AUTO_FILTER": "0"})
    assert cfg.recipe is hf_fp8.Recipe.ROWWISE and not cfg.auto_filter
    assert config_from_environment({"HF_FP8_RECIPE": "delayed"}).auto_filter
    with pytest.raises(ValueError, match="HF_FP8_AUTO_FILTER='maybe'"):
        config_from_environment({"HF_FP8_RECIPE": "delayed", "HF_FP8_AUTO_FILTER": "maybe"})

    for k in [k for k in list(__import__("os").environ) if k.startswith(("ACCELERATE_", "HF_FP8_"))]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HF_FP8_RECIPE", "rowwise")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # an earlier test's Accelerator fixed the process-wide state
    sys.path.insert(0, str(EXAMPLES))
    try:
        losses = importlib.import_module("finetune_accelerate").main(["--steps", "1"])
    finally:
        sys.path.remove(str(EXAMPLES))
        AcceleratorState._reset_state(True)
    assert len(losses) == 1 and "FP8 layers: 28" in capsys.readouterr().out  # 0 before


def test_cpu_says_once_that_fp8_is_emulated(caplog, monkeypatch):
    from hf_fp8 import linear_ops

    monkeypatch.setattr(linear_ops, "_EMULATION_NOTED", False)
    layer = hf_fp8.Fp8Linear.from_linear(torch.nn.Linear(32, 32), hf_fp8.Fp8Config())
    with caplog.at_level(logging.WARNING, logger="hf_fp8"):
        layer(torch.randn(4, 32))
        layer(torch.randn(4, 32))
    notes = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    assert len(notes) == 1 and "a CPU" in notes[0] and len(notes[0].splitlines()) == 1


@pytest.mark.parametrize("name, package, extra", [("Accelerator", "accelerate", "train")])
def test_missing_optional_dependency_names_the_pip_extra(monkeypatch, name, package, extra):
    for mod in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.delitem(sys.modules, "hf_fp8.integrations.accelerate_plugin", raising=False)
    monkeypatch.setitem(sys.modules, package, None)  # import accelerate -> ModuleNotFoundError
    with pytest.raises(ImportError, match=rf"hf_fp8.{name} needs {package}.*pip install 'hf_fp8\[{extra}\]'"):
        getattr(hf_fp8, name)
