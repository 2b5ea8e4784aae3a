"""Host (CPU) time of one FP8 linear layer's forward and backward, and of its parts.

    python -m benchmarks.profile_host

In a model the GPU hides host work only while its queue is full; the profile of an 8-layer
Llama showed the GPU waiting on the host for 7 ms of a 183 ms step with the MLP layers in FP8,
30 ms with every projection in FP8. This measures what each piece costs the host: tiny shapes
(64x256 -> 256) so the GPU is never the bottleneck, N calls enqueued back to back, time per call
from the host clock (no synchronization inside the loop), with our cached Triton launches
(:mod:`hf_fp8.kernels._launch`) and again with every launch through the JIT. Results:
``benchmarks/results/host_h100.json``.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.common import host_us as _host_us


def host_us(fn) -> float:
    return _host_us(fn, n=300, warmup=20)  # the settings results/host_h100.json was measured with


def main() -> None:
    import hf_fp8
    from benchmarks.common import environment, write_json
    from hf_fp8 import quantize as Q
    from hf_fp8.config import Fp8Config
    from hf_fp8.gemm import scaled_mm
    from hf_fp8.scaling import Role, quantize_operand

    torch.manual_seed(0)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    lin = nn.Linear(256, 256, bias=False, device="cuda", dtype=torch.bfloat16)

    def fwd_bwd(m):
        def run():
            m(x).backward(g)

        return run

    def fwd(m):
        def run():
            with torch.no_grad():
                m(x)

        return run

    def measure() -> dict[str, float]:
        rows = {}
        rows["nn.Linear fwd+bwd"] = host_us(fwd_bwd(lin))
        rows["nn.Linear fwd"] = host_us(fwd(lin))
        for recipe in ("tensorwise", "delayed"):
            m = hf_fp8.Fp8Linear.from_linear(
                nn.Linear(256, 256, bias=False, device="cuda", dtype=torch.bfloat16), Fp8Config(recipe=recipe)
            )
            rows[f"Fp8Linear {recipe} fwd+bwd"] = host_us(fwd_bwd(m))
            rows[f"Fp8Linear {recipe} fwd (no grad)"] = host_us(fwd(m))
            cfg = m.fp8_config
            w = m.weight.detach()
            rows[f"quantize_operand {recipe} weight (rows)"] = host_us(
                lambda: quantize_operand(
                    w,
                    Role.WEIGHT,
                    cfg,
                    want_rows=True,
                    want_t=False,
                    nonfinite_flag=m.fp8_nonfinite,
                    delayed=m._fp8_delayed,
                )
            )
        xd = x.detach()
        rows["quantize_tensorwise rows+t (amax + cast launches)"] = host_us(
            lambda: Q.quantize_tensorwise(xd, torch.float8_e4m3fn, write_y=True, write_t=True)
        )
        scale = torch.ones((), device="cuda")
        rows["quantize_with_scale t (one cast launch)"] = host_us(
            lambda: Q.quantize_with_scale(xd, torch.float8_e4m3fn, scale)
        )
        hist = torch.zeros(16, 3, device="cuda")
        sc = torch.ones(3, device="cuda")
        rows["delayed_scale_update (one tiny launch)"] = host_us(
            lambda: Q.delayed_scale_update(hist, sc, 0, torch.float8_e4m3fn)
        )
        q = Q.quantize_tensorwise(xd, torch.float8_e4m3fn)
        qw = Q.quantize_tensorwise(lin.weight.detach(), torch.float8_e4m3fn)
        rows["scaled_mm"] = host_us(
            lambda: scaled_mm(q.data, qw.data.t(), q.scale_inv, qw.scale_inv, out_dtype=torch.bfloat16, emulate=False)
        )
        rows["tensor view (scale[0])"] = host_us(lambda: sc[0])
        rows["torch.empty"] = host_us(lambda: torch.empty(16, device="cuda"))

        return rows

    from hf_fp8.kernels import _launch

    fast_launch = _launch._ENABLED
    rows = measure()
    _launch._ENABLED = False  # every Triton launch through the JIT's argument binding, as before
    rows_jit = measure()
    _launch._ENABLED = fast_launch
    for k, v in rows.items():
        print(f"{v:9.1f} us  {k}   (JIT launches: {rows_jit[k]:.1f} us)", flush=True)
    write_json(
        "host_h100.json",
        dict(
            env=environment(),
            unit="us per call (host)",
            fast_launch=fast_launch,
            rows=rows,
            rows_jit_launch=rows_jit,
        ),
    )


if __name__ == "__main__":
    main()
