"""Which linear layers FP8 makes faster: the automatic filter's shape rule.

FP8 halves the GEMM time at large shapes but adds quantization passes over the activation,
the weight and the output gradient, whose cost grows with M*K, N*K and M*N rather than
M*N*K. Small layers, and above all layers with a small output dimension (a 4096->1024
k/v projection), lose more to those passes than the FP8 GEMM saves. The thresholds below
are per recipe and come from our own sweep on an H100 (``benchmarks/bench_linear.py
--sweep``, results in ``benchmarks/results/``): ``Fp8Linear`` forward+backward against BF16
``nn.Linear`` at M=8192 tokens, K and N from 512 to 14336. A layer is converted when both
its dimensions reach the recipe's minimums, the smallest shapes at which FP8 was faster.
They are H100 numbers; other GPUs (or much smaller M) move them.
"""

from __future__ import annotations

import dataclasses

from hf_fp8.config import Recipe

__all__ = ["ShapeThreshold", "THRESHOLDS", "passes_shape_rule"]


@dataclasses.dataclass(frozen=True)
class ShapeThreshold:
    min_in_features: int  # K
    min_out_features: int  # N


# Measured: see the module docstring and benchmarks/results/linear_sweep_h100.json.
THRESHOLDS: dict[Recipe, ShapeThreshold] = {
    Recipe.TENSORWISE: ShapeThreshold(min_in_features=2048, min_out_features=2048),
    Recipe.DELAYED: ShapeThreshold(min_in_features=2048, min_out_features=2048),
    Recipe.ROWWISE: ShapeThreshold(min_in_features=2048, min_out_features=2048),
}


def passes_shape_rule(in_features: int, out_features: int, recipe: Recipe) -> tuple[bool, str]:
    """(convert?, reason) for a layer of this shape under ``recipe``'s measured thresholds."""
    th = THRESHOLDS[recipe]
    if in_features >= th.min_in_features and out_features >= th.min_out_features:
        return True, ""
    return False, (
        f"too small for FP8 to pay off ({recipe.value} needs in>={th.min_in_features}, "
        f"out>={th.min_out_features} on H100)"
    )
