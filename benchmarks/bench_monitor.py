"""FP8 health monitor overhead on the H100: training steps of an HF Llama with Llama-3-8B shapes.

    python -m benchmarks.bench_monitor [--layers 8] [--batch 2] [--seq 4096] [--rounds 8] [--interval 100]

Model: hidden 4096, MLP 14336, 32/8 heads, vocab 128256, SDPA, BF16, ``--layers`` decoder layers,
converted with ``hf_fp8.convert`` (default config: tensorwise; on these shapes the auto filter
converts the MLP projections), trained with fused ``torch.optim.AdamW`` on a fixed random batch.

Four kinds of step, interleaved in each round so that clock and thermal drift hit them alike:

- ``off``: no monitor at all;
- ``idle``: ``Fp8Monitor.step_begin/step_end`` on a step it does not sample (no hook is registered);
- ``sampled``: a sampled step of the default monitor (every Fp8Linear input), including
  ``step_end``'s single host copy, the per-layer reduction in Python and the JSON-lines write;
- ``sampled_all_linear``: a sampled step with ``modules="linear"`` (every ``nn.Linear``), the heavier option.

A monitor that samples one step in ``interval`` costs, amortized, relative to a step without it:
``overhead = (t_sampled - t_off) / interval / t_off`` (medians). Idle steps register no hook and
run the very same code as ``off``; ``t_idle - t_off`` is reported as a check (it measures noise).
``--tiny`` runs the same code on a small model on the CPU, to check the script itself.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from benchmarks.common import environment, warm_up_gpu, write_json

KINDS = ("off", "idle", "sampled", "sampled_all_linear")


def build(layers: int, device: str, tiny: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = (
        dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
        if tiny
        else dict(
            hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
        )
    )
    cfg = LlamaConfig(
        num_hidden_layers=layers,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        attn_implementation="sdpa",
        **shape,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model


def overhead(medians: dict[str, float], interval: int, sampled_kind: str = "sampled") -> float:
    """Amortized relative cost of a monitor sampling one step in ``interval`` (see the module docstring)."""
    return (medians[sampled_kind] - medians["off"]) / interval / medians["off"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--interval", type=int, default=None, help="default: the monitor's default interval")
    ap.add_argument("--tiny", action="store_true", help="a small model on the CPU: checks the script, times nothing")
    ap.add_argument("--out", default=None, help="results file name (default monitor_h100.json)")
    args = ap.parse_args(argv)

    import hf_fp8
    from hf_fp8.monitor import DEFAULT_INTERVAL, Fp8Monitor

    interval = args.interval or DEFAULT_INTERVAL
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    if cuda:
        warm_up_gpu()
    model = build(args.layers, device, args.tiny)
    report = hf_fp8.convert(model, hf_fp8.Fp8Config(auto_filter=not args.tiny))
    print(f"{len(report.converted)} layers converted", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device, generator=g)
    log_dir = tempfile.mkdtemp(prefix="bench_monitor_")
    monitors = {
        "sampled": Fp8Monitor(model, interval=interval, log_dir=log_dir, warn=False),
        "sampled_all_linear": Fp8Monitor(model, interval=interval, modules="linear", warn=False),
    }
    monitors["idle"] = monitors["sampled"]
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(kind: str, n: int) -> tuple[float, float]:
        """One training step; (seconds, peak GB)."""
        mon = monitors.get(kind)
        step_no = n * interval + (1 if kind == "idle" else 0)  # idle: never a multiple of interval
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        if mon is not None:
            mon.step_begin(step_no)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        metrics = mon.step_end(step_no) if mon is not None else None
        sync()
        seconds = time.perf_counter() - t0
        if kind.startswith("sampled") and not metrics:
            raise RuntimeError(f"{kind}: the monitor recorded nothing on step {step_no}")
        if kind == "idle" and metrics is not None:
            raise RuntimeError(f"idle: the monitor sampled step {step_no}")
        return seconds, (torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0)

    for i in range(args.warmup):  # compile-free, but allocator and autotune caches settle
        for kind in KINDS if i == args.warmup - 1 else ("off",):
            step(kind, i + 1)
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    peaks: dict[str, float] = dict.fromkeys(KINDS, 0.0)
    for r in range(args.rounds):
        for kind in KINDS:
            seconds, peak = step(kind, args.warmup + r + 1)
            times[kind].append(seconds * 1e3)
            peaks[kind] = max(peaks[kind], peak)
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = dict(
        layers=args.layers,
        batch=args.batch,
        seq=args.seq,
        interval=interval,
        rounds=args.rounds,
        fp8_layers=len(report.converted),
        monitored_layers={k: len(monitors[k].layers) for k in ("sampled", "sampled_all_linear")},
        step_ms={k: {"median": medians[k], "min": min(v), "max": max(v)} for k, v in times.items()},
        peak_mem_gb=peaks,
        sampled_extra_ms=medians["sampled"] - medians["off"],
        sampled_all_linear_extra_ms=medians["sampled_all_linear"] - medians["off"],
        idle_extra_ms=medians["idle"] - medians["off"],
        idle_extra_pct=100 * (medians["idle"] / medians["off"] - 1),
        overhead_pct=100 * overhead(medians, interval),
        overhead_all_linear_pct=100 * overhead(medians, interval, "sampled_all_linear"),
        sampled_step_overhead_pct=100 * (medians["sampled"] / medians["off"] - 1),
    )
    for k in KINDS:
        print(
            f"{k:20s} step {medians[k]:9.1f} ms (min {min(times[k]):.1f}, max {max(times[k]):.1f}), peak {peaks[k]:.1f} GB"
        )
    print(
        f"sampled step: +{result['sampled_extra_ms']:.1f} ms ({result['sampled_step_overhead_pct']:.1f}% of a step, "
        f"{result['monitored_layers']['sampled']} layers); all nn.Linear: +{result['sampled_all_linear_extra_ms']:.1f} ms "
        f"({result['monitored_layers']['sampled_all_linear']} layers); idle step: {result['idle_extra_ms']:+.2f} ms "
        f"({result['idle_extra_pct']:+.2f}%, noise: no hook is registered)"
    )
    print(
        f"amortized overhead at interval {interval}: {result['overhead_pct']:.3f}% "
        f"(all nn.Linear: {result['overhead_all_linear_pct']:.3f}%)"
    )
    name = args.out or ("monitor_tiny_cpu.json" if args.tiny else "monitor_h100.json")
    if not args.tiny or args.out:
        print(f"wrote {write_json(name, {'env': environment(), **result})}")
    return result


if __name__ == "__main__":
    main()
