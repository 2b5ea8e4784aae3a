"""The auto filter's thresholds are the ones the committed H100 sweep gives."""

from __future__ import annotations

import pytest

from benchmarks.derive_thresholds import DEFAULT, derive, derive_in_model
from hf_fp8.config import Recipe
from hf_fp8.filter import THRESHOLDS, passes_shape_rule


def test_thresholds_match_the_committed_sweeps():
    """Rowwise from the per-layer sweep; tensorwise and delayed from the in-model group sweep."""
    derived = derive(DEFAULT)
    assert derived["rowwise"] == (THRESHOLDS[Recipe.ROWWISE].min_weight_numel, THRESHOLDS[Recipe.ROWWISE].min_dim)
    in_model = derive_in_model()
    for recipe in (Recipe.TENSORWISE, Recipe.DELAYED):
        assert in_model == (THRESHOLDS[recipe].min_weight_numel, THRESHOLDS[recipe].min_dim), recipe


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
        (4096, 14336, Recipe.TENSORWISE, True),  # Llama-3-8B gate/up
        (14336, 4096, Recipe.TENSORWISE, True),  # down
        (4096, 4096, Recipe.TENSORWISE, True),  # q/o: 0.70x alone, but in the 8B-shaped model they pay
        (4096, 1024, Recipe.TENSORWISE, False),  # k/v alone (converted with q: see the convert tests)
        (2048, 8192, Recipe.DELAYED, True),  # Llama-3.2-1B-shaped MLP: pays in the model
        (2048, 2048, Recipe.DELAYED, False),  # its q/o: slower in the model
        (4096, 4096, Recipe.ROWWISE, False),  # 0.55x for rowwise
        (8192, 4096, Recipe.ROWWISE, True),  # 1.15x
        (4096, 14336, Recipe.ROWWISE, True),  # 1.22x
    ],
)
def test_rule_on_llama_shapes(k, n, recipe, ok):
    assert passes_shape_rule(k, n, recipe)[0] is ok
