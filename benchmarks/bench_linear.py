"""Fp8Linear forward+backward against BF16 nn.Linear and torchao Float8Linear, in one run.

Every provider runs the same work: ``y = layer(x); y.backward(dy)`` with BF16 parameters,
x of shape (M, K) requiring grad, the weight requiring grad, gradients reset between
calls. Times are medians of CUDA-event-timed repeats (triton's do_bench). Ratios are
BF16 time / provider time (higher is better).

    python -m benchmarks.bench_linear                 # Llama-3-8B and small shapes, all providers
    python -m benchmarks.bench_linear --sweep         # the K x N grid behind the auto filter
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import hf_fp8
from benchmarks.common import bench_ms, environment, warm_up_gpu, write_json

LLAMA8B_SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
SMALL_SHAPES = [(2048, 2048), (2048, 512), (1024, 1024)]
SWEEP_DIMS = [512, 1024, 2048, 4096, 8192, 14336]


def _torchao_available() -> bool:
    try:
        import torchao.float8  # noqa: F401

        return True
    except Exception:
        return False


def setup(provider: str, M: int, K: int, N: int):
    """Return a zero-argument fwd+bwd step for ``provider``."""
    torch.manual_seed(0)
    lin = nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    if provider == "bf16":
        mod = lin
    elif provider.startswith("hf_fp8-"):
        recipe, _, extra = provider.removeprefix("hf_fp8-").partition("-")
        cfg = hf_fp8.Fp8Config(recipe=recipe, use_fast_accum=(extra == "fastacc"))
        mod = hf_fp8.Fp8Linear.from_linear(lin, cfg)
    elif provider.startswith("torchao-"):
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        recipe, _, extra = provider.removeprefix("torchao-").partition("-")
        mod = nn.Sequential(lin)
        convert_to_float8_training(mod, config=Float8LinearConfig.from_recipe_name(recipe))
        if extra == "compile":
            torch._dynamo.reset()  # a fresh cache per shape: never fall back to eager at the recompile limit
            mod = torch.compile(mod)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    params = list(mod.parameters())

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        mod(x).backward(dy)

    return step


def providers(with_torchao: bool, compile_torchao: bool) -> list[str]:
    ps = [
        "bf16",
        "hf_fp8-tensorwise",
        "hf_fp8-tensorwise-fastacc",
        "hf_fp8-delayed",
        "hf_fp8-delayed-fastacc",
        "hf_fp8-rowwise",
    ]
    if with_torchao:
        ps += ["torchao-tensorwise", "torchao-rowwise"]
        if compile_torchao:
            ps += ["torchao-tensorwise-compile", "torchao-rowwise-compile"]
    return ps


def run_shapes(shapes, M: int, provs: list[str], budget_s: float) -> list[dict]:
    rows = []
    t_start = time.time()
    for K, N in shapes:
        base = None
        for p in provs:
            if time.time() - t_start > budget_s:
                rows.append(dict(provider=p, K=K, N=N, M=M, skipped="time budget"))
                continue
            try:
                step = setup(p, M, K, N)
                t = bench_ms(step)
            except Exception as e:
                rows.append(dict(provider=p, K=K, N=N, M=M, error=f"{type(e).__name__}: {str(e)[:300]}"))
                print(f"{p:28s} M={M} K={K} N={N}: ERROR {e}", flush=True)
                continue
            flops = 3 * 2 * M * K * N
            row = dict(provider=p, M=M, K=K, N=N, **t, tflops=flops / (t["ms"] * 1e-3) / 1e12)
            if p == "bf16":
                base = t["ms"]
            if base:
                row["speedup_vs_bf16"] = base / t["ms"]
            rows.append(row)
            print(
                f"{p:28s} M={M} K={K:5d} N={N:5d}: {t['ms']:.3f} ms  {row['tflops']:.0f} TFLOP/s  "
                f"x{row.get('speedup_vs_bf16', float('nan')):.2f}",
                flush=True,
            )
            del step
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="K x N sweep for the auto-filter thresholds")
    ap.add_argument("--M", type=int, default=8192)
    ap.add_argument("--no-compile", action="store_true", help="skip torchao + torch.compile providers")
    ap.add_argument("--budget-s", type=float, default=400, help="stop timing new cases after this many seconds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.sweep:
        shapes = [(k, n) for k in SWEEP_DIMS for n in SWEEP_DIMS]
        provs = ["bf16", "hf_fp8-tensorwise", "hf_fp8-delayed", "hf_fp8-rowwise"]
        out = args.out or "linear_sweep_h100.json"
    else:
        shapes = LLAMA8B_SHAPES + SMALL_SHAPES
        provs = providers(_torchao_available(), not args.no_compile)
        out = args.out or "linear_h100.json"
    warm_up_gpu()
    rows = run_shapes(shapes, args.M, provs, args.budget_s)
    path = write_json(out, {"env": environment(), "M": args.M, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
