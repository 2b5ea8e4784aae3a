"""AdamW step on the parameters of an 8-layer Llama-3-8B-shaped model (2.8 B BF16 parameters):
torch's fused AdamW against hf_fp8.optim.AdamW, on the H100, side by side in one run.

    python -m benchmarks.bench_adamw [--layers 8] [--sweep]

Each optimizer gets the same BF16 parameters and gradients (random, never zero), steps 3 times
to warm up, then 10 timed steps: the median step time from CUDA events (the GPU's time,
launch gaps included), the host's time per ``step()`` call, and the bandwidth the step moved
at (14 bytes per parameter with BF16 moments: p, g, m, v read, p, m, v written; 22 with FP32
moments). ``--sweep`` also times the kernel's BLOCK x NUM_WARPS settings. Results:
``benchmarks/results/adamw_h100.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.bench_llama import CONFIGS


def llama_param_shapes(config: dict, layers: int) -> list[tuple[int, ...]]:
    """The parameter shapes of HF's LlamaForCausalLM with this config, in model order."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    layer = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i), (h,), (h,)]
    return [(v, h)] + layer * layers + [(h,), (v, h)]


def _params(shapes, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02)
        p.grad = torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=g) * 1e-3
        out.append(p)
    return out


def time_steps(opt, warmup: int = 3, steps: int = 10) -> dict:
    for _ in range(warmup):
        opt.step()
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        opt.step()
        host.append(time.perf_counter() - t0)
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end))
    return dict(step_ms=statistics.median(gpu), host_ms=statistics.median(host) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--sweep", action="store_true", help="also time the kernel's BLOCK x NUM_WARPS settings")
    ap.add_argument("--out", default="adamw_h100.json")
    args = ap.parse_args()
    from benchmarks.common import environment, warm_up_gpu, write_json
    from hf_fp8.kernels import adamw as adamw_kernel
    from hf_fp8.optim import AdamW

    warm_up_gpu()
    shapes = llama_param_shapes(CONFIGS["8b"], args.layers)
    n = sum(torch.Size(s).numel() for s in shapes)
    variants = {
        "torch_fused_bf16_states": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "hf_fp8_bf16_states_nearest": lambda ps: AdamW(
            ps, lr=1e-4, state_dtype=torch.bfloat16, stochastic_rounding=False, seed=0
        ),
        "hf_fp8_bf16_states_stochastic": lambda ps: AdamW(ps, lr=1e-4, state_dtype=torch.bfloat16, seed=0),
        "hf_fp8_fp32_states_stochastic": lambda ps: AdamW(ps, lr=1e-4, seed=0),
    }
    default = (adamw_kernel.BLOCK, adamw_kernel.NUM_WARPS)
    settings = [default]
    if args.sweep:
        settings += [(b, w) for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16) if (b, w) != default]
    rows = []
    params = _params(shapes)
    reference = None
    for name, make in variants.items():
        for block, warps in settings if name.startswith("hf_fp8") else [(None, None)]:
            if block is not None:
                adamw_kernel.BLOCK, adamw_kernel.NUM_WARPS = block, warps
            for p, q in zip(params, _params(shapes)):  # the same starting point for every variant
                p.data.copy_(q.data)
                p.grad.copy_(q.grad)
            opt = make(params)
            timed = time_steps(opt)
            state_bytes = opt.state[params[0]]["exp_avg"].element_size()
            moved = n * (2 + 2 + 2 * 2 * state_bytes + 2)  # p, g, m, v read; p, m, v written
            row = dict(variant=name, block=block, num_warps=warps if block else None, **timed,
                       bytes_per_param=moved / n, tb_per_s=moved / timed["step_ms"] / 1e9)  # fmt: skip
            if name == "torch_fused_bf16_states":
                reference = [p.detach().clone() for p in params[:3]]
            elif name == "hf_fp8_bf16_states_nearest" and reference is not None:
                # after 13 identical steps: the share of weights equal to torch's (rounding order aside)
                same = [(p == r).float().mean().item() for p, r in zip(params[:3], reference)]
                row["same_weights_as_torch"] = min(same)
            rows.append(row)
            print(row, flush=True)
            del opt
            torch.cuda.empty_cache()
    adamw_kernel.BLOCK, adamw_kernel.NUM_WARPS = default
    base = rows[0]["step_ms"]
    for r in rows:
        r["speedup_vs_torch_fused"] = base / r["step_ms"]
    write_json(args.out, {"env": environment(), "layers": args.layers, "params": n, "rows": rows})


if __name__ == "__main__":
    main()
