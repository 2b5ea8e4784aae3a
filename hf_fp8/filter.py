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

- delayed: a model, not a layer alone. ``python -m benchmarks.bench_llama --configs 1b 8b``
  times an HF Llama step with no FP8 layer, every decoder linear, only the MLPs, or only the
  attention projections in FP8 (variants ``_nofp8 _all _mlponly _attnonly``,
  ``benchmarks/results/llama_groups_h100.json``); ``benchmarks.derive_thresholds`` takes the
  fastest at each size and the smallest weight and dimension it converts: 8B-shaped, all
  (179.0 ms against 185.0 for the MLPs only: the q/o projections, 4096x4096, pay inside this
  model though 0.75x timed alone); 1B-shaped (hidden 2048), none (140.4 ms; the MLPs only
  141.9, all 181.4); and Qwen2.5-7B-shaped (hidden 3584, MLP 18944;
  ``benchmarks/results/llama_groups_families_h100.json``), all 183.8 ms against 228.0 with none.
  Hence 12.8M weights (3584x3584) with both dimensions >= 3584. (With 16.8M and 4096, derived
  before the Qwen measurement, the default converted none of Qwen2.5-7B's layers: 1.20x stock
  instead of 1.48x.)
- tensorwise and rowwise: each layer timed alone at M=8192 (``python -m benchmarks.bench_linear
  --sweep``, ``benchmarks/results/linear_sweep_h100.json``), the smallest measured weight from
  which every larger measured shape was faster in FP8. For tensorwise this agrees with the
  in-model runs (8B: the MLPs only 188.1 ms, all 188.4; 1B: none fastest), which cannot place
  a threshold below the 8B MLP's 58.7M weights; the per-layer sweep can (4096x8192: 1.49x).

- steps replayed as CUDA graphs (``Fp8Config(cuda_graph=True)``, which ``--fp8_cuda_graph``
  sets; :class:`hf_fp8.CudaGraphStep`): the same in-model groups, graphed
  (``benchmarks/results/llama_groups_graph_h100.json``). With no host launch overhead every
  decoder linear pays at both sizes and for both per-tensor recipes (1B-shaped, delayed: all
  120.5 ms, the MLPs only 122.9, none 139.7; tensorwise: 125.4, 126.8, 138.7; 8B-shaped,
  tensorwise: all 181.0 ms against 188.0 for the MLPs only), hence 4.2M weights (the 1B q/o
  projections, 2048x2048) and dimensions >= 2048. Rowwise was not measured graphed: its
  eager thresholds apply.

Other GPUs, much smaller M (tokens per micro-batch) or a slow host move these. Override with
``auto_filter=False`` plus ``include``/``exclude`` patterns.
"""

from __future__ import annotations

import dataclasses

from hf_fp8.config import Recipe

__all__ = [
    "GRAPH_THRESHOLDS",
    "SHARED_INPUT_GROUPS",
    "THRESHOLDS",
    "ShapeThreshold",
    "input_sharing_siblings",
    "passes_shape_rule",
]


@dataclasses.dataclass(frozen=True)
class ShapeThreshold:
    min_weight_numel: int  # in_features * out_features
    min_dim: int  # min(in_features, out_features)


# Derived by benchmarks/derive_thresholds.py: delayed from the in-model group sweeps
# (benchmarks/results/llama_groups_h100.json, llama_groups_families_h100.json), tensorwise and rowwise from the per-layer sweep
# (benchmarks/results/linear_sweep_h100.json). tests/test_filter.py checks that these still
# match those files, and that tensorwise's agree with its in-model runs.
THRESHOLDS: dict[Recipe, ShapeThreshold] = {
    Recipe.TENSORWISE: ShapeThreshold(min_weight_numel=29_360_128, min_dim=2048),
    Recipe.DELAYED: ShapeThreshold(min_weight_numel=12_845_056, min_dim=3584),
    Recipe.ROWWISE: ShapeThreshold(min_weight_numel=33_554_432, min_dim=4096),
    # not measured yet: rowwise's (the other recipe whose casts reduce per row before they write)
    Recipe.BLOCKWISE: ShapeThreshold(min_weight_numel=33_554_432, min_dim=4096),
}

# Steps replayed as CUDA graphs (Fp8Config(cuda_graph=True)): derived by derive_thresholds.py
# from benchmarks/results/llama_groups_graph_h100.json (tests/test_filter.py checks it); recipes
# not listed (rowwise: not measured graphed) use THRESHOLDS.
GRAPH_THRESHOLDS: dict[Recipe, ShapeThreshold] = {
    Recipe.TENSORWISE: ShapeThreshold(min_weight_numel=4_194_304, min_dim=2048),
    Recipe.DELAYED: ShapeThreshold(min_weight_numel=4_194_304, min_dim=2048),
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


def passes_shape_rule(
    in_features: int, out_features: int, recipe: Recipe, cuda_graph: bool = False
) -> tuple[bool, str]:
    """(convert?, reason) for a layer of this shape under ``recipe``'s measured thresholds (those
    measured with graph-replayed steps when ``cuda_graph``)."""
    th = GRAPH_THRESHOLDS.get(recipe, THRESHOLDS[recipe]) if cuda_graph else THRESHOLDS[recipe]
    if in_features * out_features >= th.min_weight_numel and min(in_features, out_features) >= th.min_dim:
        return True, ""
    steps = "graph" if cuda_graph and recipe in GRAPH_THRESHOLDS else "eager"
    return False, (
        f"too small for FP8 to pay off ({recipe.value}, H100 {steps}: in*out >= "
        f"{th.min_weight_numel / 2**20:.0f}Mi, dims >= {th.min_dim})"
    )
