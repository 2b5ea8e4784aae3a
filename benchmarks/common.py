"""Shared benchmark plumbing: environment record, timing, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def git_sha() -> str:
    sha = os.environ.get("HF_FP8_GIT_SHA")
    if sha:
        return sha
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, text=True).strip()
    except Exception:
        return "unknown"


def environment() -> dict:
    def version(pkg: str) -> str | None:
        try:
            import importlib.metadata as md

            return md.version(pkg)
        except Exception:
            return None

    env = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "torchao": version("torchao"),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sm_count=p.multi_processor_count, capability=list(torch.cuda.get_device_capability()))
    return env


def bench_ms(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100, cudagraph: bool = False) -> dict:
    """Median / p20 / p80 milliseconds over repeated CUDA-event-timed calls (triton's do_bench).

    ``cudagraph=True`` replays a captured CUDA graph instead, so host-side launch overhead
    is excluded: the right measure of a kernel's own bandwidth when the host is slower than
    the kernel (a 64 MB quantization takes ~65 us on the GPU but ~135 us of Python to launch).
    """
    import triton.testing

    if cudagraph:
        fn()  # compile outside the capture
        q = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    else:
        q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"ms": q[0], "ms_p20": q[1], "ms_p80": q[2], "cudagraph": cudagraph}


def time_training_steps(
    model, optimizer, batches, warmup: int, forward_backward=None, host_wait_s: float = 0.0
) -> dict:
    """Causal-LM training steps (labels = inputs) on each batch of ``batches``; the first
    ``warmup`` are not timed. Returns the median step time, tokens/s, peak memory since the
    first step, and every step's loss (one host sync per step: the timing needs it anyway).
    ``forward_backward(ids) -> loss`` replaces the eager forward and backward (a
    :class:`hf_fp8.CudaGraphStep`: its capture, in the first step, counts in the peak).
    ``host_wait_s``: the host sleeps this long at the start of each timed step, the GPU idle
    (a probe: how much of a host delay at a step's start the step's time shows). A batch may be
    a dict of model inputs (padded batches: ``input_ids``, ``attention_mask``, ``labels``);
    tokens/s then counts the real (unpadded) tokens."""
    import time

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i, ids in enumerate(batches):
        sync()
        t0 = time.perf_counter()
        if host_wait_s:
            time.sleep(host_wait_s)
        if isinstance(ids, dict):
            if forward_backward is not None:
                raise ValueError("time_training_steps: padded (dict) batches need the eager step")
            loss = model(**ids).loss
            loss.backward()
        elif forward_backward is None:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        else:
            loss = forward_backward(ids)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    ms = statistics.median(times) * 1e3
    return dict(
        step_ms=ms,
        tokens_per_s=(int(ids["attention_mask"].sum()) if isinstance(ids, dict) else ids.numel()) / (ms / 1e3),
        peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0,
        # a CUDA graph's replays use its private pool without allocating: only what is reserved shows them
        peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9 if cuda else 0.0,
        losses=losses,
    )


def each_variant(names, measure: Callable[[str], dict]):
    """``measure(name)`` for each name, yielding its row; a variant that raises yields its error
    instead (a failed variant is a result too). The GPU is cleaned between variants: garbage
    collected, cache emptied, dynamo reset (compiled variants leave state behind)."""
    import gc

    for name in names:
        try:
            row = measure(name)
        except Exception as e:  # noqa: BLE001
            row = dict(variant=name, error=f"{type(e).__name__}: {str(e)[:300]}")
        gc.collect()  # the variant's model and optimizer are unreachable now
        torch.cuda.empty_cache()
        torch._dynamo.reset()
        yield row


def host_us(fn: Callable[[], object], n: int = 200, warmup: int = 10) -> float:
    """Host (CPU) time per call of ``fn`` in microseconds: ``n`` calls enqueued back to back,
    timed on the host clock with no synchronization inside the loop (the GPU never the limit
    when ``fn``'s kernels are small)."""
    import time

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def warm_up_gpu(seconds: float = 1.0) -> None:
    """Run large matmuls first so clocks and caches are settled before the first timed shape
    (without it the first shape measured up to 2x slower in one run)."""
    import time

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t0 = time.time()
    while time.time() - t0 < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def median(xs):
    return statistics.median(xs)


def write_json(name: str, payload: dict) -> Path:
    out_dirs = [RESULTS]
    if os.environ.get("OUT"):
        out_dirs.append(Path(os.environ["OUT"]))
    path = None
    for d in out_dirs:
        d.mkdir(parents=True, exist_ok=True)
        path = d / name
        path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    return path
