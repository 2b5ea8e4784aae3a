"""Every ``torch._scaled_mm`` call of one training step, timed where it runs.

    python -m benchmarks.profile_gemm_calls [--variant hf_fp8_delayed]

A CUDA event is recorded before and after each FP8 GEMM of one step of the 8B-shaped model
(same model, batches and optimizer as ``bench_llama``), grouped by operand shape, layout and
format. The time between the two events is the kernel's, plus any wait for the host's launch
of it when the GPU had nothing queued: set against the same GEMMs timed alone
(``bench_gemm_shapes``), it shows both slow kernels and where inside a layer the GPU starves.
Results: ``benchmarks/results/gemm_calls_h100.json``.
"""

from __future__ import annotations

import argparse
import collections

import torch


def main() -> None:
    from benchmarks.bench_llama import CONFIGS, bigram_batches, build
    from benchmarks.common import environment, warm_up_gpu, write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="hf_fp8_delayed")
    args = ap.parse_args()
    warm_up_gpu()
    model, opt, note = build(args.variant, CONFIGS["8b"])
    batches = bigram_batches(2, 4096, CONFIGS["8b"]["vocab_size"], 5)

    def step(ids):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for ids in batches[:3]:
        step(ids)
    torch.cuda.synchronize()
    calls = []
    real = torch._scaled_mm

    def timed(a, b, **kw):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = real(a, b, **kw)
        end.record()
        key = (tuple(a.shape), a.stride(), str(a.dtype), tuple(b.shape), b.stride(), str(b.dtype))
        calls.append((key, start, end))
        return out

    torch._scaled_mm = timed
    try:
        for ids in batches[3:5]:  # the second step's calls are kept
            calls.clear()
            step(ids)
            torch.cuda.synchronize()
    finally:
        torch._scaled_mm = real
    by_key = collections.defaultdict(list)
    for key, start, end in calls:
        by_key[key].append(start.elapsed_time(end))
    rows = []
    for key, times in sorted(by_key.items(), key=lambda kv: -sum(kv[1])):
        (M, K), N = key[0], key[3][1]
        ms = sum(times) / len(times)
        rows.append(dict(a_shape=key[0], a_stride=key[1], a_dtype=key[2], b_shape=key[3], b_stride=key[4],
                         b_dtype=key[5], calls=len(times), ms_mean=ms, ms_min=min(times), ms_max=max(times),
                         tflops_mean=2 * M * N * K / ms / 1e9))  # fmt: skip
        r = rows[-1]
        print(f"{len(times):3d}x a{key[0]} {key[2][-6:]} b{key[3]} {key[5][-6:]}: mean {ms:.4f} min {min(times):.4f} "
              f"max {max(times):.4f} ms, {r['tflops_mean']:.0f} TFLOP/s", flush=True)  # fmt: skip
    out = dict(env=environment(), variant=args.variant, note=note, calls_per_step=len(calls), rows=rows)
    print(f"wrote {write_json('gemm_calls_h100.json', out)}")


if __name__ == "__main__":
    main()
