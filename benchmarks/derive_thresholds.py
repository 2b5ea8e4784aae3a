"""Turn the measurements into the auto filter's per-recipe rule: the K x N sweep of single layers
(rowwise), and the in-model sweep of layer groups (tensorwise, delayed; :func:`derive_in_model`).

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


IN_MODEL = Path(__file__).parent / "results" / "llama_groups_h100.json"
IN_MODEL_GRAPH = Path(__file__).parent / "results" / "llama_groups_graph_h100.json"  # the same, steps as CUDA graphs
# other families' shapes (Qwen2.5-7B: hidden 3584), the default recipe with no FP8 layer and with all
IN_MODEL_FAMILIES = Path(__file__).parent / "results" / "llama_groups_families_h100.json"
# the layer groups each in-model variant converts (besides the lm_head, never converted)
_GROUPS_OF = {"all": ("attention", "mlp"), "mlponly": ("mlp",), "attnonly": ("attention",), "nofp8": ()}


def _leaders(config: dict, group: str) -> list[tuple[int, int]]:
    """(in, out) of the layers of ``group`` that must pass the shape rule on their own: the
    others (k and v; up) are converted with the layer they share their input with."""
    h, i = config["hidden_size"], config["intermediate_size"]
    if group == "attention":
        return [(h, h), (h, h)]  # q_proj (k, v follow it), o_proj
    return [(h, i), (i, h)]  # gate_proj (up follows it), down_proj


def in_model_choices(
    path: Path | tuple[Path, ...] = (IN_MODEL, IN_MODEL_FAMILIES), recipe: str = "delayed", suffix: str = ""
) -> list[tuple[int, int, bool]]:
    """(in, out, converted by the fastest variant at its model size) for each group's leading layers,
    over one results file or several. ``suffix``: only variants ending with it (``"_graph"``: steps
    replayed as CUDA graphs). Model sizes with no variant of ``recipe`` are skipped."""
    from benchmarks.bench_llama import CONFIGS

    paths = (path,) if isinstance(path, (str, Path)) else path
    rows = [r for p in paths for r in json.loads(Path(p).read_text())["rows"] if "step_ms" in r]
    prefix = f"hf_fp8_{recipe}_"
    out = []
    for cfg in sorted({r["config"] for r in rows}):
        timed = {
            r["variant"].removeprefix(prefix).removesuffix(suffix): r["step_ms"]
            for r in rows
            if r["config"] == cfg and r["variant"].endswith(suffix)
        }
        measured = [v for v in _GROUPS_OF if v in timed]
        if not measured:
            continue
        best = min(measured, key=timed.__getitem__)
        out += [
            (k, n, group in _GROUPS_OF[best])
            for group in ("attention", "mlp")
            for k, n in _leaders(CONFIGS[cfg], group)
        ]
    return out


def derive_in_model(
    path: Path | tuple[Path, ...] = (IN_MODEL, IN_MODEL_FAMILIES), recipe: str = "delayed", suffix: str = ""
) -> tuple[int, int]:
    """(min_weight_numel, min_dim) from whole-model steps: at each model size, the fastest of
    ``hf_fp8_<recipe>_{nofp8,all,mlponly,attnonly}``; the smallest weight and the smallest
    dimension any fastest variant converts, if those keep every layer a fastest variant keeps
    in BF16 (else a ValueError: no rule of this form fits the measurements)."""
    choices = in_model_choices(path, recipe, suffix)
    converted = [(k, n) for k, n, c in choices if c]
    kept = [(k, n) for k, n, c in choices if not c]
    if not converted:
        return 1 << 62, 1 << 31  # nothing paid off: convert nothing
    numel, dim = min(k * n for k, n in converted), min(min(k, n) for k, n in converted)
    if any(k * n >= numel and min(k, n) >= dim for k, n in kept):
        raise ValueError(f"{recipe}: no size rule keeps what the fastest variants keep and converts what they convert")
    return numel, dim


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    for recipe, (numel, dim) in derive(path).items():
        print(f"{recipe:10s} min_weight_numel={numel:>11,d}  min_dim={dim}  (each layer alone, {path.name})")
    for recipe in ("tensorwise", "delayed"):
        numel, dim = derive_in_model(recipe=recipe)
        print(
            f"{recipe:10s} min_weight_numel={numel:>11,d}  min_dim={dim}  (in a model, {IN_MODEL.name} + {IN_MODEL_FAMILIES.name})"
        )
        numel, dim = derive_in_model(IN_MODEL_GRAPH, recipe, "_graph")
        print(f"{recipe:10s} min_weight_numel={numel:>11,d}  min_dim={dim}  (graph steps, {IN_MODEL_GRAPH.name})")
