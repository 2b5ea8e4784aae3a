"""Which linear layers FP8 makes faster: the automatic filter's shape rule.

FP8 halves the GEMM time at large shapes but adds quantization passes over the activation,
the weight and the output gradient (and host work per launch), whose cost grows with
M*K, N*K and M*N, or not at all, rather than with M*N*K. Small layers lose more to those
passes than the FP8 GEMM saves.

The rule, per recipe: convert when ``in_features * out_features >= min_weight_numel`` and
``min(in_features, out_features) >= min_dim``; and convert a layer that reads the same input
as a converted one (q/k/v, gate/up: :data:`SHARED_INPUT_GROUPS`), which then pays only its
weight's cast (the input's is shared; DESIGN.md: "Llama-3-8B's k/v projections ... unless the
activation cast is shared").

Where the numbers come from (H100):

- tensorwise and delayed: a model, not a layer alone. ``python -m benchmarks.bench_llama
  --configs 1b 8b --variants ... _all _mlponly _attnonly`` times an HF Llama step with every
  decoder linear, only the MLPs or only the attention projections in FP8
  (``benchmarks/results/llama_groups_h100.json``); ``benchmarks.derive_thresholds`` takes the
  fastest at each size (1B-shaped: the MLPs only, 1.40x stock against 1.33x with none and 1.16x
  with all; 8B-shaped: all, 1.451x against 1.416x for the MLPs only) and puts the threshold at
  the smallest weight it converts (2048x8192 and 4096x4096: 16.8M), above the largest it keeps
  (2048x2048: 4.2M). Timed alone, 4096x4096 was 0.75x: inside a model the host's launch work
  hides behind other layers' GPU time, which a layer alone cannot show.
- rowwise: each layer timed alone at M=8192 (``python -m benchmarks.bench_linear --sweep``,
  ``benchmarks/results/linear_sweep_h100.json``), the smallest measured weight from which every
  larger measured shape was faster in FP8: 4096x8192 1.18x, 4096x4096 0.55x. No in-model data.

Other GPUs, much smaller M (tokens per micro-batch) or a slow host move these. Override with
``auto_filter=False`` plus ``include``/``exclude`` patterns.
"""

from __future__ import annotations

import dataclasses

from hf_fp8.config import Recipe

__all__ = ["ShapeThreshold", "THRESHOLDS", "SHARED_INPUT_GROUPS", "input_sharing_siblings", "passes_shape_rule"]


@dataclasses.dataclass(frozen=True)
class ShapeThreshold:
    min_weight_numel: int  # in_features * out_features
    min_dim: int  # min(in_features, out_features)


# Derived by benchmarks/derive_thresholds.py: tensorwise and delayed from the in-model group
# sweep (benchmarks/results/llama_groups_h100.json, measured with delayed scaling; tensorwise
# casts cost the same, and the per-layer sweep gave both recipes the same thresholds), rowwise
# from the per-layer sweep (benchmarks/results/linear_sweep_h100.json). tests/test_filter.py
# checks that these still match those files.
THRESHOLDS: dict[Recipe, ShapeThreshold] = {
    Recipe.TENSORWISE: ShapeThreshold(min_weight_numel=16_777_216, min_dim=2048),
    Recipe.DELAYED: ShapeThreshold(min_weight_numel=16_777_216, min_dim=2048),
    Recipe.ROWWISE: ShapeThreshold(min_weight_numel=33_554_432, min_dim=4096),
}

# Sibling layers (by their last name component, under one parent module) that read the same
# input: HF Llama's attention projections and its MLP's gate/up.
SHARED_INPUT_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
)


def input_sharing_siblings(name: str) -> tuple[str, ...]:
    """Fully qualified names of the layers that read the same input as layer ``name`` (itself excluded)."""
    parent, _, leaf = name.rpartition(".")
    for group in SHARED_INPUT_GROUPS:
        if leaf in group:
            return tuple(f"{parent}.{n}" if parent else n for n in sorted(group - {leaf}))
    return ()


def passes_shape_rule(in_features: int, out_features: int, recipe: Recipe) -> tuple[bool, str]:
    """(convert?, reason) for a layer of this shape under ``recipe``'s measured thresholds."""
    th = THRESHOLDS[recipe]
    if in_features * out_features >= th.min_weight_numel and min(in_features, out_features) >= th.min_dim:
        return True, ""
    return False, (
        f"too small for FP8 to pay off ({recipe.value} needs in*out >= {th.min_weight_numel / 2**20:.0f}Mi "
        f"and both dims >= {th.min_dim}, measured on H100; no input-sharing sibling converted)"
    )
