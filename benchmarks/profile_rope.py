"""Where the RoPE fwd+bwd time goes on the GPU: device time (CUDA graph) vs host time vs eager wall.

    python -m benchmarks.profile_rope

Same shapes as bench_precision_ops' rope section (B=2, S=4096, 32/8 heads, D=128, BF16).
Prints, per provider: eager wall time (do_bench), device time (CUDA-graph replay, no host
launch cost), host time per call (enqueue only, GPU never the bottleneck), and a profiler
table of our fwd+bwd's host-side ops.
"""

from __future__ import annotations

import torch

from benchmarks.bench_precision_ops import rope_inputs
from benchmarks.common import bench_ms, environment, host_us, warm_up_gpu, write_json


def main() -> None:
    from hf_fp8.integrations.rope import fp32_rope
    from hf_fp8.kernels import rope as rk

    (B, S, Hq, Hk, D), rotary, hf_apply, inv_freq, pos, q_lin, k_lin, gq, gk = rope_inputs()
    q4, k4 = q_lin.view(B, S, Hq, D), k_lin.view(B, S, Hk, D)
    gq4, gk4 = gq.transpose(1, 2), gk.transpose(1, 2)

    def hf(q, k):
        cos, sin = rotary(q, pos)
        return hf_apply(q.view(B, S, Hq, D).transpose(1, 2), k.view(B, S, Hk, D).transpose(1, 2), cos, sin)

    def ours(q, k):
        qo, ko = fp32_rope(q.view(B, S, Hq, D), k.view(B, S, Hk, D), pos, inv_freq)
        return qo.transpose(1, 2), ko.transpose(1, 2)

    def fwd_bwd(fn):
        def run():
            q = q_lin.detach().requires_grad_()
            k = k_lin.detach().requires_grad_()
            qo, ko = fn(q, k)
            torch.autograd.backward([qo, ko], [gq, gk])

        return run

    warm_up_gpu()
    rows = []
    cases = {
        "hf_eager fwd": lambda: hf(q_lin, k_lin),
        "hf_eager fwd+bwd": fwd_bwd(hf),
        "hf_fp8 fwd": lambda: ours(q_lin, k_lin),
        "hf_fp8 fwd+bwd": fwd_bwd(ours),
        "kernel fwd (rope_fwd)": lambda: rk.rope_fwd(q4, k4, pos, inv_freq),
        "kernel fwd+bwd (rope_fwd, rope_bwd)": lambda: (
            rk.rope_fwd(q4, k4, pos, inv_freq),
            rk.rope_bwd(gq4, gk4, pos, inv_freq),
        ),
        "autograd overhead only (detach, requires_grad, backward of a view)": lambda: torch.autograd.backward(
            [q_lin.detach().requires_grad_().view(B, S, Hq, D).transpose(1, 2)], [gq]
        ),
    }
    for name, fn in cases.items():
        r = dict(case=name, eager_ms=bench_ms(fn)["ms"], host_us=host_us(fn))
        try:
            r["cudagraph_ms"] = bench_ms(fn, cudagraph=True)["ms"]
        except Exception as e:  # noqa: BLE001
            r["cudagraph_ms"] = None
            r["cudagraph_error"] = repr(e)[:200]
        rows.append(r)
        print(
            f"{name:70s} eager {r['eager_ms']:.3f} ms  graph {r['cudagraph_ms']}  host {r['host_us']:.0f} us",
            flush=True,
        )

    from torch.profiler import ProfilerActivity, profile

    run = fwd_bwd(ours)
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60))
    write_json("rope_profile_h100.json", {"env": environment(), "rows": rows})


if __name__ == "__main__":
    main()
