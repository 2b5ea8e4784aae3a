"""Turn the K x N sweep into the auto filter's per-recipe rule.

Rule: convert a layer when ``in_features * out_features >= min_weight_numel`` and
``min(in_features, out_features) >= min_dim``. For each recipe, ``min_weight_numel`` is the
smallest measured weight size from which *every* larger measured shape ran faster in FP8
than in BF16, and ``min_dim`` the smallest dimension among those shapes: conservative,
shapes between grid points stay BF16 unless measured faster.

    python -m benchmarks.derive_thresholds [benchmarks/results/linear_sweep_h100.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT = Path(__file__).parent / "results" / "linear_sweep_h100.json"


def derive(path: Path = DEFAULT) -> dict[str, tuple[int, int]]:
    rows = [r for r in json.loads(Path(path).read_text())["rows"] if "speedup_vs_bf16" in r]
    out: dict[str, tuple[int, int]] = {}
    for provider in sorted({r["provider"] for r in rows if r["provider"].startswith("hf_fp8-")}):
        recipe = provider.removeprefix("hf_fp8-")
        shapes = sorted(
            (r["K"] * r["N"], r["K"], r["N"], r["speedup_vs_bf16"]) for r in rows if r["provider"] == provider
        )
        # walk from the largest weight down while every shape so far is faster in FP8
        passing = []
        for numel, k, n, speedup in reversed(shapes):
            if speedup <= 1.0:
                break
            passing.append((numel, k, n))
        if not passing:
            continue
        out[recipe] = (min(p[0] for p in passing), min(min(p[1], p[2]) for p in passing))
    return out


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    for recipe, (numel, dim) in derive(path).items():
        print(f"{recipe:10s} min_weight_numel={numel:>11,d}  min_dim={dim}")
