"""What one GEMM per layer group would save in the backward (H100 probe; not a product path).

q/k/v (and gate/up) read one input, so their input gradients are summed: today each layer's
dgrad is its own FP8 GEMM writing a BF16 partial (8192 x 4096), and the norm's backward kernel
reads and sums the partials. With the group's output gradients in one FP8 tensor (tokens x
sum of widths, one scale) and the weights' transposes side by side (one scale), the dgrad is
one GEMM over K = 6144 (28672 for gate/up) writing one partial, and the wgrad one GEMM over
M = 6144 writing the three weight gradients as row blocks.

Times the separate and the grouped forms with CUDA graphs (no host work), 8B-shaped layer,
8192 tokens: dgrad GEMMs + the norm's backward kernel, and the wgrad GEMMs.

    python -m benchmarks.bench_group_backward [--out group_backward_h100.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import bench_ms, environment

RESULTS = Path(__file__).parent / "results"


def _fp8(shape, dtype, scale=0.05):
    return (torch.randn(shape, device="cuda") * scale * 448).clamp(-400, 400).to(dtype)


def _col_major(t):  # (K, N) view of a (N, K) row-major tensor: what _scaled_mm wants as b
    return t.t()


def measure(tokens: int, hidden: int, widths: list[int]) -> list[dict]:
    from hf_fp8.kernels.norm_swiglu import rms_norm_backward

    one = torch.ones((), device="cuda")
    bf16 = torch.bfloat16
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    # separate: per layer, dY_i (tokens x w_i) row-major, W_i^T copy (hidden x w_i) -> b = (w_i x hidden) col-major
    dys = [_fp8((tokens, w), e5) for w in widths]
    dys_t = [_fp8((w, tokens), e5) for w in widths]
    wts = [_fp8((hidden, w), e4) for w in widths]  # W_i^T, row-major (hidden x w_i)
    x_t = _fp8((hidden, tokens), e4)  # the input's transposed FP8 copy
    # grouped: the same data side by side
    dy_cat = torch.cat(dys, dim=1).contiguous()  # (tokens x total)
    dy_t_cat = torch.cat(dys_t, dim=0).contiguous()  # (total x tokens)
    wt_cat = torch.cat(wts, dim=1).contiguous()  # (hidden x total)
    x = torch.randn(tokens, hidden, device="cuda", dtype=bf16)
    norm_w = torch.randn(hidden, device="cuda", dtype=bf16)
    rstd = torch.rand(tokens, device="cuda") + 0.5
    res = torch.randn(tokens, hidden, device="cuda", dtype=bf16)

    def dgrad_separate():
        parts = [torch._scaled_mm(dy, _col_major(wt), one, one, out_dtype=bf16) for dy, wt in zip(dys, wts)]
        return rms_norm_backward(parts, x, norm_w, rstd, True, res)

    def dgrad_grouped():
        part = torch._scaled_mm(dy_cat, _col_major(wt_cat), one, one, out_dtype=bf16)
        return rms_norm_backward([part], x, norm_w, rstd, True, res)

    def dgrad_gemms_separate():
        return [torch._scaled_mm(dy, _col_major(wt), one, one, out_dtype=bf16) for dy, wt in zip(dys, wts)]

    def dgrad_gemm_grouped():
        return torch._scaled_mm(dy_cat, _col_major(wt_cat), one, one, out_dtype=bf16)

    def wgrad_separate():
        return [torch._scaled_mm(dyt, _col_major(x_t), one, one, out_dtype=bf16) for dyt in dys_t]

    def wgrad_grouped():
        return torch._scaled_mm(dy_t_cat, _col_major(x_t), one, one, out_dtype=bf16)

    # the grouped forms compute the same sums (one scale of 1 everywhere): check before timing
    a, b = dgrad_separate()[0].float(), dgrad_grouped()[0].float()
    same_dgrad = float((a - b).abs().max() / a.abs().max())
    ws, wg = wgrad_separate(), wgrad_grouped()
    same_wgrad = float(max((s.float() - g.float()).abs().max() for s, g in zip(ws, wg.split(widths, 0))))
    rows = []
    for name, fn in [
        ("dgrad_gemms_separate", dgrad_gemms_separate),
        ("dgrad_gemm_grouped", dgrad_gemm_grouped),
        ("dgrad_plus_norm_bwd_separate", dgrad_separate),
        ("dgrad_plus_norm_bwd_grouped", dgrad_grouped),
        ("wgrad_separate", wgrad_separate),
        ("wgrad_grouped", wgrad_grouped),
    ]:
        r = bench_ms(fn, cudagraph=True)
        rows.append(dict(group=widths, tokens=tokens, hidden=hidden, case=name, **r))
        print(f"{str(widths):>14} {name:>30} {r['ms']:.4f} ms", flush=True)
    rows.append(dict(group=widths, case="check", dgrad_rel_diff=same_dgrad, wgrad_max_abs_diff=same_wgrad))
    print(f"{str(widths):>14} check dgrad rel diff {same_dgrad:.2e}, wgrad max abs diff {same_wgrad:.2e}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", default="group_backward_h100.json")
    args = ap.parse_args()
    rows = []
    for widths in ([4096, 1024, 1024], [1024, 1024], [14336, 14336]):
        rows += measure(args.tokens, 4096, widths)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / args.out
    path.write_text(json.dumps(dict(env=environment(), rows=rows), indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
