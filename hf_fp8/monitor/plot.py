"""Plot the FP8 health monitor's log: ``python -m hf_fp8.monitor.plot <logdir> [--out file.png]``.

Reads ``fp8_monitor.jsonl`` (``<logdir>`` may be the file itself, the directory holding it, or
a directory above it: the newest log below it is used) and writes a PNG with three panels over
the sampled steps: activation kurtosis (every layer, and the maximum, with the warning
threshold), the fractions of input values the FP8 cast saturates and flushes to zero, and each
layer's amax. Only the JSON-lines log is read, not TensorBoard event files. Needs matplotlib
(``pip install hf_fp8[monitor]``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from hf_fp8.monitor.records import find_log, read_records

__all__ = ["main", "plot"]


def _import_pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "hf_fp8.monitor.plot needs matplotlib: pip install 'hf_fp8[monitor]' (or pip install matplotlib)"
        ) from e
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in records:
        v = r["metrics"].get(key)
        if v is not None and not math.isnan(v):
            steps.append(r["step"])
            values.append(v)
    return steps, values


def _layers(records: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        for key in r["metrics"]:
            if key.endswith("/kurtosis") and not key.startswith("fp8/max_"):
                seen[key[len("fp8/") : -len("/kurtosis")]] = None
    return list(seen)


def plot(log: str | Path, out: str | Path | None = None) -> Path:
    """Write the PNG for the monitor log at (or below) ``log``; returns its path.

    Args:
        log (`str` or `Path`): ``fp8_monitor.jsonl``, or a directory holding one (searched recursively).
        out (`str` or `Path`, *optional*): the PNG to write; defaults to ``fp8_monitor.png`` beside the log.
    """
    path = find_log(log)
    records = [r for r in read_records(path) if isinstance(r.get("metrics"), dict) and "step" in r]
    if not records:
        raise ValueError(f"{path}: no monitor records in it (has training reached a sampled step?)")
    # one record per step, the last written (a log that a resumed run appended to by hand may
    # repeat the steps after its checkpoint; the Trainer's monitor drops those itself)
    records = sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])
    out = Path(out) if out is not None else path.with_suffix(".png")
    plt = _import_pyplot()
    layers = _layers(records)
    cmap = plt.get_cmap("viridis")
    color = {name: cmap(i / max(1, len(layers) - 1)) for i, name in enumerate(layers)}
    fig, (ax_k, ax_f, ax_a) = plt.subplots(3, 1, figsize=(10, 11), sharex=True, constrained_layout=True)

    # 1. kurtosis: every layer thin (coloured by depth), the maximum bold, the warning threshold dashed
    for name in layers:
        ax_k.plot(*_series(records, f"fp8/{name}/kurtosis"), color=color[name], lw=0.8, alpha=0.6)
    ax_k.plot(*_series(records, "fp8/max_kurtosis"), color="black", lw=2, label="max over layers")
    threshold = records[-1].get("kurtosis_threshold")
    if threshold is not None:
        ax_k.axhline(threshold, color="red", ls="--", lw=1, label=f"warning threshold {threshold:g}")
    ax_k.axhline(3.0, color="gray", ls=":", lw=1, label="Gaussian (3)")
    ax_k.set_yscale("log")
    ax_k.set_ylabel("activation kurtosis")
    top = sorted(layers, key=lambda n: -(records[-1]["metrics"].get(f"fp8/{n}/kurtosis") or 0.0))[:3]
    for name in top:  # name the layers that end highest
        ax_k.plot([], [], color=color[name], lw=1.5, label=name)
    ax_k.legend(fontsize=8, loc="upper left")
    ax_k.set_title(f"FP8 health monitor: {len(layers)} layers, {len(records)} sampled steps ({path.name})")

    # 2. what the FP8 cast loses: saturated and flushed-to-zero fractions
    for name in layers:
        ax_f.plot(*_series(records, f"fp8/{name}/underflow"), color=color[name], lw=0.8, alpha=0.4)
    ax_f.plot(*_series(records, "fp8/max_underflow"), color="tab:blue", lw=2, label="flushed to zero, max over layers")
    ax_f.plot(*_series(records, "fp8/max_saturated"), color="tab:red", lw=2, label="saturated, max over layers")
    sat_threshold = records[-1].get("saturation_threshold")
    if sat_threshold is not None:
        ax_f.axhline(sat_threshold, color="tab:red", ls="--", lw=1, label=f"saturation threshold {sat_threshold:g}")
    ax_f.set_yscale("symlog", linthresh=1e-7)  # fractions are often exactly 0
    ax_f.set_ylim(bottom=0)
    ax_f.set_ylabel("fraction of input values")
    ax_f.legend(fontsize=8, loc="upper left")

    # 3. amax per layer
    for name in layers:
        ax_a.plot(*_series(records, f"fp8/{name}/amax"), color=color[name], lw=0.8)
    ax_a.set_yscale("log")
    ax_a.set_ylabel("input amax (per layer)")
    ax_a.set_xlabel("step")

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(
        prog="python -m hf_fp8.monitor.plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("logdir", help="fp8_monitor.jsonl, or a directory holding one (e.g. the Trainer's output_dir)")
    ap.add_argument("--out", default=None, help="PNG to write (default: fp8_monitor.png beside the log)")
    args = ap.parse_args(argv)
    try:
        out = plot(args.logdir, args.out)
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))  # the reason and the usage, exit status 2, no traceback
    print(f"wrote {out.resolve()}")
    return out


if __name__ == "__main__":
    main()
