"""The FP8 GEMMs of one Llama-3-8B decoder layer's training step, one by one, at B=2, S=4096.

    python -m benchmarks.bench_gemm_shapes

The end-to-end profile names cuBLAS kernels, not shapes: four backward GEMMs per layer ran at
~510 TFLOP/s against ~1390 for the others (``llama_profile_resemb_h100.json``). Here each GEMM
of a layer is timed on its own (CUDA-graph replays, operands in the layouts and FP8 formats
hf_fp8 gives ``torch._scaled_mm``: E4M3 inputs and weights, E5M2 output gradients, BF16
outputs), so the slow ones get names. Results: ``benchmarks/results/gemm_shapes_h100.json``.
"""

from __future__ import annotations

import torch

from benchmarks.common import bench_ms, environment, warm_up_gpu, write_json

TOKENS = 8192
# (name, in_features, out_features) of the layer's linears (Llama-3-8B: 32 heads, 8 KV heads)
LINEARS = [("q", 4096, 4096), ("k", 4096, 1024), ("v", 4096, 1024), ("o", 4096, 4096),
           ("gate", 4096, 14336), ("up", 4096, 14336), ("down", 14336, 4096)]  # fmt: skip


def _fp8(shape, dtype, t: bool = False):
    x = (torch.randn(shape, device="cuda") * 0.5).to(dtype)
    return x.t().contiguous().t() if t else x  # t: column-major storage of the same matrix


def main() -> None:
    warm_up_gpu()
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    one = torch.ones((), device="cuda")
    rows = []
    for name, k, n in LINEARS:
        # forward y = x Wᵀ: x (T, K) row-major, Wᵀ (K, N) column-major (W row-major)
        # input gradient dx = dy W: dy (T, N) row-major E5M2, W (N, K) column-major (Wᵀ row-major)
        # weight gradient dW = dyᵀ x: dyᵀ (N, T) row-major, x (T, K) column-major (xᵀ row-major)
        cases = {
            "forward": (_fp8((TOKENS, k), e4), _fp8((k, n), e4, t=True)),
            "input_grad": (_fp8((TOKENS, n), e5), _fp8((n, k), e4, t=True)),
            "weight_grad": (_fp8((n, TOKENS), e5), _fp8((TOKENS, k), e4, t=True)),
        }
        for gemm, (a, b) in cases.items():
            M, K = a.shape
            N = b.shape[1]

            def run(a=a, b=b):
                return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

            t = bench_ms(run, cudagraph=True, rep_ms=200)
            tflops = 2 * M * N * K / t["ms"] / 1e9
            rows.append(dict(layer=name, gemm=gemm, M=M, N=N, K=K, ms=t["ms"], tflops=tflops))
            print(
                f"{name:5s} {gemm:12s} M={M:6d} N={N:6d} K={K:6d}: {t['ms']:.4f} ms {tflops:6.0f} TFLOP/s", flush=True
            )
    print(f"wrote {write_json('gemm_shapes_h100.json', {'env': environment(), 'tokens': TOKENS, 'rows': rows})}")


if __name__ == "__main__":
    main()
