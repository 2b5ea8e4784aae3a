"""The auto filter's thresholds are the ones the committed H100 sweep gives."""

from __future__ import annotations

import pytest
from helpers import import_benchmark

from hf_fp8.config import Recipe
from hf_fp8.filter import GRAPH_THRESHOLDS, THRESHOLDS, passes_shape_rule

_thresholds = import_benchmark("derive_thresholds")
DEFAULT, IN_MODEL_GRAPH = _thresholds.DEFAULT, _thresholds.IN_MODEL_GRAPH
derive, derive_in_model, in_model_choices = (
    _thresholds.derive,
    _thresholds.derive_in_model,
    _thresholds.in_model_choices,
)


def test_thresholds_match_the_committed_sweeps():
    """Tensorwise and rowwise from the per-layer sweep; delayed from the in-model group sweep; and
    tensorwise's per-layer thresholds make the in-model runs' fastest choice at both sizes."""
    derived = derive(DEFAULT)
    for recipe in (Recipe.TENSORWISE, Recipe.ROWWISE):
        assert derived[recipe.value] == (THRESHOLDS[recipe].min_weight_numel, THRESHOLDS[recipe].min_dim), recipe
    th = THRESHOLDS[Recipe.DELAYED]
    assert derive_in_model(recipe="delayed") == (th.min_weight_numel, th.min_dim)
    for k, n, converted in in_model_choices(recipe="tensorwise"):
        assert passes_shape_rule(k, n, Recipe.TENSORWISE)[0] is converted, (k, n)


def test_graph_step_thresholds_match_the_committed_graphed_group_sweep():
    """Fp8Config(cuda_graph=True)'s thresholds: derived from the in-model groups with graph-replayed
    steps (benchmarks/results/llama_groups_graph_h100.json), for each recipe measured there."""
    assert set(GRAPH_THRESHOLDS) == {Recipe.TENSORWISE, Recipe.DELAYED}
    for recipe, th in GRAPH_THRESHOLDS.items():
        assert derive_in_model(IN_MODEL_GRAPH, recipe.value, "_graph") == (th.min_weight_numel, th.min_dim), recipe
        for k, n, converted in in_model_choices(IN_MODEL_GRAPH, recipe.value, "_graph"):
            assert passes_shape_rule(k, n, recipe, cuda_graph=True)[0] is converted, (recipe, k, n)
    assert passes_shape_rule(2048, 8192, Recipe.ROWWISE, cuda_graph=True) == passes_shape_rule(
        2048, 8192, Recipe.ROWWISE
    )


def test_in_model_derivation_picks_the_fastest_variant(tmp_path):
    """The derivation follows the timings: made-up ones where every layer in FP8 wins at both sizes
    move the threshold down to the 1B attention projections (2048x2048)."""
    import json

    rows = [
        dict(config=c, variant=f"hf_fp8_delayed_{v}", step_ms=ms)
        for c in ("1b", "8b")
        for v, ms in (("all", 100.0), ("mlponly", 110.0), ("attnonly", 120.0))
    ]
    path = tmp_path / "groups.json"
    path.write_text(json.dumps({"rows": rows}))
    assert derive_in_model(path) == (2048 * 2048, 2048)
    rows[0]["step_ms"] = 130.0  # 1B: all FP8 now slowest, MLPs only fastest -> 1B attention kept
    path.write_text(json.dumps({"rows": rows}))
    assert derive_in_model(path) == (2048 * 8192, 2048)


@pytest.mark.parametrize(
    "k, n, recipe, ok",
    [
        (4096, 14336, Recipe.TENSORWISE, True),  # Llama-3-8B gate/up: 1.58x alone
        (14336, 4096, Recipe.TENSORWISE, True),  # down: 1.47x
        (4096, 4096, Recipe.TENSORWISE, False),  # q/o: 0.70x alone, no gain in the model with tensorwise
        (4096, 4096, Recipe.DELAYED, True),  # q/o with delayed scaling: pay in the 8B-shaped model
        (4096, 1024, Recipe.DELAYED, False),  # k/v alone (converted with q: see the convert tests)
        (2048, 8192, Recipe.DELAYED, False),  # Llama-3.2-1B-shaped MLP: no gain in that model
        (4096, 4096, Recipe.ROWWISE, False),  # 0.55x for rowwise
        (8192, 4096, Recipe.ROWWISE, True),  # 1.15x
        (4096, 14336, Recipe.ROWWISE, True),  # 1.22x
    ],
)
def test_rule_on_llama_shapes(k, n, recipe, ok):
    assert passes_shape_rule(k, n, recipe)[0] is ok
