"""Fp8Config: validation messages, serialization, derived defaults."""

from __future__ import annotations

import dataclasses

import pytest

from hf_fp8 import Fp8Config, Fp8Format, Recipe


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(recipe="fp4"), r"Fp8Config\.recipe: got 'fp4'; allowed values are 'tensorwise', 'rowwise', 'delayed'"),
        (dict(grad_format="e3m4"), r"Fp8Config\.grad_format: got 'e3m4'; allowed values are 'e4m3', 'e5m2'"),
        (dict(recipe="rowwise", grad_format="e5m2"), r"grad_format.*rowwise.*'e4m3'"),
        (dict(amax_history_len=0), r"amax_history_len: got 0; expected an int >= 1"),
        (dict(amax_history_len=2.5), r"amax_history_len: got 2.5; expected an int"),
        (dict(amax_compute_algo="mean"), r"amax_compute_algo: got 'mean'; allowed values are 'max', 'most_recent'"),
        (dict(margin=-1), r"margin: got -1"),
        (dict(auto_filter="yes"), r"auto_filter: got 'yes'; expected True or False"),
        (dict(include=("",)), r"include: got"),
        (dict(nonfinite="ignore"), r"nonfinite: got 'ignore'; allowed values are 'record', 'raise'"),
    ],
)
def test_invalid_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Fp8Config(**kwargs)


def test_defaults_per_recipe():
    assert Fp8Config().grad_format is Fp8Format.E5M2
    assert Fp8Config(recipe="rowwise").grad_format is Fp8Format.E4M3
    assert Fp8Config(recipe="DELAYED").recipe is Recipe.DELAYED
    assert Fp8Config(include="*.mlp.*").include == ("*.mlp.*",)
    assert Fp8Config().forward_format.max == 448.0 and Fp8Format.E5M2.max == 57344.0


def test_json_round_trip(tmp_path):
    cfg = Fp8Config(recipe="delayed", amax_history_len=32, exclude=("*.k_proj", "*.v_proj"), margin=1)
    assert Fp8Config.from_json(cfg.to_json()) == cfg
    path = tmp_path / "fp8.json"
    cfg.to_json(path)
    assert Fp8Config.from_json(path) == cfg
    assert Fp8Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["recipe"] == "delayed"  # plain strings in JSON
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['recipie'\]"):
        Fp8Config.from_dict({"recipie": "delayed"})


def test_frozen_and_replace_revalidates():
    cfg = Fp8Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.recipe = "rowwise"
    with pytest.raises(ValueError, match="grad_format"):
        dataclasses.replace(cfg, recipe="rowwise")  # keeps e5m2, which rowwise rejects
    assert dataclasses.replace(cfg, recipe="rowwise", grad_format=None).grad_format is Fp8Format.E4M3
    assert hash(cfg) == hash(Fp8Config())


def test_short_str():
    assert Fp8Config().short_str() == "dly:e4m3/e5m2,h16,max"  # the default recipe: delayed
    assert Fp8Config(recipe="tensorwise").short_str() == "ten:e4m3/e5m2"
    assert Fp8Config(recipe="rowwise").short_str() == "row:e4m3/e4m3"
    assert Fp8Config(recipe="delayed", amax_compute_algo="most_recent", margin=2).short_str() == (
        "dly:e4m3/e5m2,h16,most_recent,m2"
    )
