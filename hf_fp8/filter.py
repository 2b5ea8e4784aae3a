"""Which linear layers FP8 makes faster: the automatic filter's shape rule.

FP8 halves the GEMM time at large shapes but adds quantization passes over the activation,
the weight and the output gradient (and host work per launch), whose cost grows with
M*K, N*K and M*N, or not at all, rather than with M*N*K. Small layers lose more to those
passes than the FP8 GEMM saves.

The rule, per recipe: convert when ``in_features * out_features >= min_weight_numel`` and
``min(in_features, out_features) >= min_dim``. The numbers come from our own sweep on an
H100 (``python -m benchmarks.bench_linear --sweep``, results in
``benchmarks/results/linear_sweep_h100.json``): ``Fp8Linear`` forward+backward against
BF16 ``nn.Linear`` at M=8192 tokens, K and N in {512, 1024, 2048, 4096, 8192, 14336}, each
layer timed alone. ``python -m benchmarks.derive_thresholds`` derives them: the smallest
measured weight from which every larger measured shape was faster in FP8. Measured
speedups at the edges: tensorwise 2048x14336 1.17x, 14336x2048 1.08x, but 4096x4096 0.75x;
rowwise 4096x8192 1.18x, but 4096x4096 0.55x (sweep of 2026-11-24, with cached Triton launches).

These are H100 numbers with the layer timed in isolation, where the host's launch work
(about 1.5 ms per FP8 forward+backward, see benchmarks/README.md) is not hidden behind
other GPU work as it is inside a model; they are conservative for Llama-sized models and
other GPUs or much smaller M move them. Override with ``auto_filter=False`` plus
``include``/``exclude`` patterns.
"""

from __future__ import annotations

import dataclasses

from hf_fp8.config import Recipe

__all__ = ["ShapeThreshold", "THRESHOLDS", "passes_shape_rule"]


@dataclasses.dataclass(frozen=True)
class ShapeThreshold:
    min_weight_numel: int  # in_features * out_features
    min_dim: int  # min(in_features, out_features)


# Derived from benchmarks/results/linear_sweep_h100.json by benchmarks/derive_thresholds.py
# (tests/test_filter.py checks that these still match that file).
THRESHOLDS: dict[Recipe, ShapeThreshold] = {
    Recipe.TENSORWISE: ShapeThreshold(min_weight_numel=29_360_128, min_dim=2048),
    Recipe.DELAYED: ShapeThreshold(min_weight_numel=29_360_128, min_dim=2048),
    Recipe.ROWWISE: ShapeThreshold(min_weight_numel=33_554_432, min_dim=4096),
}


def passes_shape_rule(in_features: int, out_features: int, recipe: Recipe) -> tuple[bool, str]:
    """(convert?, reason) for a layer of this shape under ``recipe``'s measured thresholds."""
    th = THRESHOLDS[recipe]
    if in_features * out_features >= th.min_weight_numel and min(in_features, out_features) >= th.min_dim:
        return True, ""
    return False, (
        f"too small for FP8 to pay off ({recipe.value} needs in*out >= {th.min_weight_numel / 2**20:.0f}Mi "
        f"and both dims >= {th.min_dim}, measured on H100)"
    )
