"""Where one training step's GPU time goes: kernel time by category, host idle, host syncs, memory.

    python -m benchmarks.profile_llama [--variants stock_bf16 hf_fp8_delayed] [--config 8b]

Same models, batches and optimizer as ``bench_llama`` (B=2, S=4096). Per variant: a few
warm-up steps, then ``--steps`` steps under ``torch.profiler`` with no host sync inside a
step (one at the end), and from the trace:

- ``gpu_busy_ms``: union of kernel intervals per step; ``wall_ms`` minus it is time the GPU
  waited for the host (launch overhead, syncs).
- kernel time per category (GEMM FP8 / GEMM BF16 / FP8 casts / attention / norm+SwiGLU /
  RoPE / loss / optimizer / other), per step, and the 25 most expensive kernels.
- ``idle_gaps``: where the GPU waits inside the profiled steps: every gap of more than 5 us
  between kernels, attributed to the host code that launched the kernel after it (the
  innermost op around the launch, and the autograd node or phase: forward, backward,
  optimizer), summed per step; the 20 largest sums.
- host-to-device synchronizations inside the profiled steps (``cudaStreamSynchronize``,
  ``cudaDeviceSynchronize``, device-to-host copies), not counting the harness's synchronize
  after the last step.
- memory: allocated before the step (parameters + optimizer state) and the step's peak.

Results: ``benchmarks/results/llama_profile_h100.json``.
"""

from __future__ import annotations

import argparse
import gc
import re
import time

import torch

# (category, regex on the kernel name); first match wins. FP8 GEMMs are told apart from BF16
# ones by the launching op (aten::_scaled_mm), see _gemm_split.
CATEGORIES = [
    ("attention", r"flash|fmha|attn|attention|cudnn|sdpa"),
    ("gemm", r"gemm|nvjet|xmma|cutlass|sm90_|sm80_|cublas|splitk|s16816|s1688"),
    ("fp8_cast", r"quant|amax|fp8|scale_update|_cast"),
    ("norm_swiglu", r"rms|norm|swiglu|silu|glu"),
    ("rope", r"rope|rotary"),
    ("loss", r"_ce_|cross_entropy|log_softmax|nll"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("copy", r"copy|memcpy|memset|cat|fill"),
]
_SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def categorize(name: str) -> str:
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other"


def union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total / 1e3  # us -> ms


_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaMemcpyAsync",
             "cudaMemsetAsync", "cudaGraphLaunch")  # fmt: skip


def _launch_context(launch) -> tuple[str, str]:
    """(innermost op around a launch, its autograd node or phase) from the CPU parent chain."""
    chain, e = [], launch.cpu_parent
    while e is not None:
        chain.append(e.name)
        e = e.cpu_parent
    inner = chain[0] if chain else launch.name
    node = next((n for n in chain if n.startswith("autograd::engine::evaluate_function")), None)
    if node is not None:
        return inner, "bwd " + node.removeprefix("autograd::engine::evaluate_function: ")
    if any("Optimizer" in n for n in chain):
        return inner, "optimizer"
    return inner, "forward"


def idle_gaps(events, kernels, steps: int, min_us: float = 5.0) -> dict:
    """GPU idle time between kernels, by the host code that launched the kernel after each gap."""
    import bisect

    launches = sorted((e for e in events if e.name in _LAUNCHES), key=lambda e: e.time_range.start)
    starts = [e.time_range.start for e in launches]
    by_key: dict[tuple[str, str], list] = {}
    by_phase: dict[str, float] = {}
    big = []  # gaps over 200 us: the longest host events overlapping each (what the host was doing)
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    ks = sorted(kernels, key=lambda k: k.time_range.start)
    end = ks[0].time_range.end if ks else 0.0
    for k in ks[1:]:
        gap = k.time_range.start - end
        if gap > min_us:
            i = bisect.bisect_right(starts, k.time_range.start) - 1
            inner, where = _launch_context(launches[i]) if i >= 0 else ("?", "?")
            slot = by_key.setdefault((where, inner), [0.0, 0])
            slot[0] += gap / 1e3 / steps
            slot[1] += 1
            if gap > 200:
                t0, t1 = end, k.time_range.start
                over = [e for e in cpu if e.time_range.start < t1 and e.time_range.end > t0]
                over.sort(key=lambda e: -(min(e.time_range.end, t1) - max(e.time_range.start, t0)))
                big.append(dict(ms=round(gap / 1e3, 3), where=where[:80], op=inner[:80],
                                host=[(e.name[:60], round(e.time_range.elapsed_us() / 1e3, 3)) for e in over[:8]]))  # fmt: skip
            phase = where.split(" ")[0]
            by_phase[phase] = by_phase.get(phase, 0.0) + gap / 1e3 / steps
        end = max(end, k.time_range.end)
    top = sorted(by_key.items(), key=lambda kv: -kv[1][0])[:20]
    return dict(
        big=big,
        total_ms=round(sum(by_phase.values()), 3),
        by_phase_ms={k: round(v, 3) for k, v in by_phase.items()},
        top=[dict(where=w[:90], op=o[:90], ms=round(v[0], 3), gaps=v[1] // steps) for (w, o), v in top],
    )


def profile_variant(name: str, config: dict, batch: int, seq: int, warmup: int, steps: int) -> dict:
    from benchmarks.bench_llama import bigram_batches, build

    model, opt, note = build(name, config)
    batches = bigram_batches(batch, seq, config["vocab_size"], warmup + steps)

    graphed = None
    if "_graph" in name:  # forward and backward replayed as one CUDA graph (CudaGraphStep)
        from hf_fp8.cuda_graph import CudaGraphStep

        graphed = CudaGraphStep(model)
    events_at = [torch.cuda.Event(enable_timing=True) for _ in range(3)]

    def step(ids, timed: bool = False):
        if timed:
            events_at[0].record()
        if graphed is None:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        else:
            loss = graphed(input_ids=ids, labels=ids)
        if timed:
            events_at[1].record()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if timed:
            events_at[2].record()
        return loss

    for ids in batches[:warmup]:
        step(ids)
    torch.cuda.synchronize()
    # GPU time of the forward+backward and of the optimizer (event to event: host gaps included)
    phases = []
    for ids in batches[:warmup]:
        step(ids, timed=True)
        torch.cuda.synchronize()
        phases.append((events_at[0].elapsed_time(events_at[1]), events_at[1].elapsed_time(events_at[2])))
    phases.sort()
    fwd_bwd_ms, optimizer_ms = phases[len(phases) // 2]
    static_gb = torch.cuda.memory_allocated() / 1e9
    torch.cuda.reset_peak_memory_stats()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    gc_ms: list[float] = []
    gc_t0: list[float] = []

    def gc_timer(phase, info):  # Python's garbage collections during the profiled steps
        if phase == "start":
            gc_t0.append(time.perf_counter())
        elif gc_t0:
            gc_ms.append((time.perf_counter() - gc_t0.pop()) * 1e3)

    gc.callbacks.append(gc_timer)
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for ids in batches[warmup:]:
            step(ids)
        with torch.profiler.record_function("harness_sync"):
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    gc.callbacks.remove(gc_timer)
    peak_gb = torch.cuda.max_memory_allocated() / 1e9

    events = prof.events()
    # device-side user annotations (e.g. "Optimizer.step#AdamW.step") span kernels: not kernels themselves
    kernels = [
        e
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
        and "#" not in e.name
    ]
    by_cat: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for k in kernels:
        ms = k.time_range.elapsed_us() / 1e3
        cat = categorize(k.name)
        by_cat[cat] = by_cat.get(cat, 0.0) + ms / steps
        slot = by_name.setdefault(k.name, [0.0, 0, cat])
        slot[0] += ms / steps
        slot[1] += 1
    fp8_gemm_ms = _op_device_ms(prof, "aten::_scaled_mm") / steps
    if "gemm" in by_cat:
        by_cat["gemm_fp8"] = fp8_gemm_ms
        by_cat["gemm_bf16"] = by_cat.pop("gemm") - fp8_gemm_ms
    busy = union_ms([(k.time_range.start, k.time_range.end) for k in kernels]) / steps
    # syncs inside the steps: everything but the harness's own synchronize after the last step
    harness = [e.time_range for e in events if e.name == "harness_sync"]
    syncs: dict[str, int] = {}
    for e in events:
        ours = any(h.start <= e.time_range.start <= h.end for h in harness)
        if (e.name in _SYNC_NAMES or "DtoH" in e.name) and not ours:
            syncs[e.name] = syncs.get(e.name, 0) + 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:40]
    row = dict(
        variant=name,
        note=note,
        wall_ms=wall_ms,
        gpu_busy_ms=busy,
        host_idle_ms=wall_ms - busy,
        kernels_per_step=len(kernels) / steps,
        category_ms={k: round(v, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        top_kernels=[dict(name=n[:160], ms=round(v[0], 3), calls=v[1] // steps, category=v[2]) for n, v in top],
        host_syncs=syncs,
        idle_gaps=idle_gaps(events, kernels, steps),
        gc_pauses_per_step=dict(
            n=len(gc_ms) / steps, ms=round(sum(gc_ms) / steps, 3), max_ms=round(max(gc_ms, default=0), 3)
        ),
        allocator_calls_per_step={n: sum(1 for e in events if e.name == n) / steps for n in ("cudaMalloc", "cudaFree")},
        fwd_bwd_event_ms=fwd_bwd_ms,
        optimizer_event_ms=optimizer_ms,
        static_mem_gb=static_gb,
        peak_mem_gb=peak_gb,
        activation_and_temp_gb=peak_gb - static_gb,
    )
    return row


def _op_device_ms(prof, op_name: str) -> float:
    for avg in prof.key_averages():
        if avg.key == op_name:
            total = getattr(avg, "device_time_total", None)
            return (total if total is not None else avg.cuda_time_total) / 1e3
    return 0.0


def main() -> None:
    from benchmarks.bench_llama import CONFIGS
    from benchmarks.common import each_variant, environment, warm_up_gpu, write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["stock_bf16", "hf_fp8_delayed", "torchao_tensorwise_compile"])
    ap.add_argument("--config", default="8b", choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default="llama_profile_h100.json")
    args = ap.parse_args()
    warm_up_gpu()
    rows = []
    measure = lambda name: profile_variant(name, CONFIGS[args.config], args.batch, args.seq, args.warmup, args.steps)  # noqa: E731
    for row in each_variant(args.variants, measure):
        name = row["variant"]
        rows.append(row)
        print(name, {k: v for k, v in row.items() if k not in ("top_kernels", "idle_gaps")}, flush=True)
        for t in row.get("top_kernels", [])[:12]:
            print(f"   {t['ms']:8.3f} ms x{t['calls']:<4} {t['category']:<12} {t['name'][:100]}", flush=True)
        gaps = row.get("idle_gaps", {})
        print("   idle gaps:", gaps.get("total_ms"), gaps.get("by_phase_ms"), flush=True)
        print("   gc:", row.get("gc_pauses_per_step"), "allocator:", row.get("allocator_calls_per_step"), flush=True)
        for b in gaps.get("big", [])[:6]:
            print("   big gap", b, flush=True)
        for t in gaps.get("top", [])[:12]:
            print(f"   gap {t['ms']:7.3f} ms x{t['gaps']:<4} {t['where'][:60]:<60} {t['op'][:60]}", flush=True)
        write_json(args.out, dict(env=environment(), config=args.config, batch=args.batch, seq=args.seq,
                                  steps=args.steps, rows=rows))  # fmt: skip


if __name__ == "__main__":
    main()
