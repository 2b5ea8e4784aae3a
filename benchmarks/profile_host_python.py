"""Where the host's time goes in the forward of a training step, and the GPU's clocks in the step.

    python -m benchmarks.profile_host_python [--variants hf_fp8_delayed torchao_tensorwise_compile]

``profile_host_lead`` showed the eager forward of the 8B-shaped model close to host-bound: ~3.6
ms of host time per decoder layer against ~4.0 ms of GPU time, so the GPU waits in layer 0.
Here, per variant (same model, batches and optimizer as ``bench_llama``):

- ``forward_host_ms``: host time of the forward alone (median over steps), no profiler;
- ``python_top``: cProfile of the forward (the backward's Python runs on autograd's thread,
  which cProfile does not see): the functions with the most own time, per forward, so the
  host's hot spots can be attacked one by one (cProfile slows Python ~2x: read them as shares);
- ``clocks``: ``nvidia-smi`` sampled every 50 ms over a run of steps: SM clock, power draw and
  the active clock-event reasons (power or thermal capping would make every kernel slower
  together, which a kernel-by-kernel profile cannot show).

Results: ``benchmarks/results/host_python_h100.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import subprocess
import time

import torch


def _clock_samples(run_steps) -> dict:
    query = "clocks.sm,power.draw,clocks_event_reasons.active"
    try:
        proc = subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-lms", "50"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
    except OSError as e:
        run_steps()
        return dict(error=str(e))
    time.sleep(0.3)
    run_steps()
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    sm, power, reasons = [], [], {}
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            sm.append(float(parts[0]))
            power.append(float(parts[1]))
        except ValueError:
            continue
        reasons[parts[2]] = reasons.get(parts[2], 0) + 1
    if not sm:
        return dict(error="no samples")
    return dict(
        samples=len(sm),
        sm_mhz_median=statistics.median(sm),
        sm_mhz_min=min(sm),
        power_w_median=statistics.median(power),
        power_w_max=max(power),
        event_reasons=reasons,  # bitmask -> samples (0x4: SW power cap, 0x20/0x40: thermal slowdown)
    )


def profile_variant(name: str, config: dict, batch: int, seq: int, warmup: int, steps: int) -> dict:
    from benchmarks.bench_llama import bigram_batches, build

    model, opt, note = build(name, config)
    batches = bigram_batches(batch, seq, config["vocab_size"], warmup + steps + 12)
    fwd_host = []

    def step(ids, profiler=None, record=False):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        loss = model(input_ids=ids, labels=ids).loss
        if profiler is not None:
            profiler.disable()
        if record:
            fwd_host.append((time.perf_counter() - t0) * 1e3)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    for ids in batches[:warmup]:
        step(ids)
    for ids in batches[warmup : warmup + steps]:
        step(ids, record=True)
    prof = cProfile.Profile()
    for ids in batches[warmup + steps : warmup + 2 * steps]:
        step(ids, profiler=prof)
    stats = pstats.Stats(prof)
    top = []
    for (file, line, fn), (_cc, nc, tt, ct, _) in stats.stats.items():
        top.append(dict(function=f"{file.split('site-packages/')[-1].split('/work/')[-1]}:{line}({fn})",
                        calls_per_forward=nc / steps, own_ms=tt * 1e3 / steps, cum_ms=ct * 1e3 / steps))  # fmt: skip
    by_own = sorted(top, key=lambda r: -r["own_ms"])[:40]
    by_cum = sorted(top, key=lambda r: -r["cum_ms"])[:40]
    clocks = _clock_samples(lambda: [step(ids) for ids in batches[warmup + 2 * steps :]])
    return dict(
        variant=name,
        note=note,
        forward_host_ms=statistics.median(fwd_host),
        python_by_own_time=by_own,
        python_by_cumulative_time=by_cum,
        clocks=clocks,
    )


def main() -> None:
    from benchmarks.bench_llama import CONFIGS
    from benchmarks.common import environment, warm_up_gpu, write_json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["hf_fp8_delayed", "torchao_tensorwise_compile"])
    p.add_argument("--config", default="8b")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="host_python_h100.json")
    args = p.parse_args()
    warm_up_gpu()
    rows = []
    for name in args.variants:
        try:
            r = profile_variant(name, CONFIGS[args.config], 2, 4096, 3, args.steps)
        except Exception as e:  # noqa: BLE001  a failed variant is a result too
            r = dict(variant=name, error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(r)
        if "error" in r:
            print(name, r["error"], flush=True)
            continue
        print(f"{name}: forward host {r['forward_host_ms']:.2f} ms; clocks {r['clocks']}", flush=True)
        for t in r["python_by_own_time"][:25]:
            print(
                f"  {t['own_ms']:7.3f} own {t['cum_ms']:7.3f} cum {t['calls_per_forward']:6.0f}x {t['function'][:110]}"
            )
        print("  -- by cumulative")
        for t in r["python_by_cumulative_time"][:25]:
            print(
                f"  {t['own_ms']:7.3f} own {t['cum_ms']:7.3f} cum {t['calls_per_forward']:6.0f}x {t['function'][:110]}"
            )
    print(f"wrote {write_json(args.out, {'env': environment(), 'config': args.config, 'rows': rows})}")


if __name__ == "__main__":
    main()
