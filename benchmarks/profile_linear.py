"""Where an Fp8Linear fwd+bwd spends its time: host overhead per step and the kernel table.

python -m benchmarks.profile_linear [--M 8192 --K 2048 --N 512 --recipe tensorwise]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import hf_fp8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", type=int, default=8192)
    ap.add_argument("--K", type=int, default=2048)
    ap.add_argument("--N", type=int, default=512)
    ap.add_argument("--recipe", default="tensorwise")
    args = ap.parse_args()
    lin = nn.Linear(args.K, args.N, bias=False, device="cuda", dtype=torch.bfloat16)
    mods = {
        "bf16": lin,
        "fp8": hf_fp8.Fp8Linear.from_linear(
            nn.Linear(args.K, args.N, bias=False, device="cuda", dtype=torch.bfloat16),
            hf_fp8.Fp8Config(recipe=args.recipe),
        ),
    }
    x = torch.randn(args.M, args.K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(args.M, args.N, device="cuda", dtype=torch.bfloat16)
    for name, mod in mods.items():

        def step():
            x.grad = None
            mod.weight.grad = None
            mod(x).backward(dy)

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        n = 50
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        t_host = (time.perf_counter() - t0) / n
        torch.cuda.synchronize()
        t_all = (time.perf_counter() - t0) / n
        print(f"{name}: host time per step (no sync) {t_host * 1e3:.3f} ms, wall with sync {t_all * 1e3:.3f} ms")
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
