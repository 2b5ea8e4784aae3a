"""Achieved bandwidth of each FP8 quantization kernel against a device-to-device copy.

Kernels (and the copy) are timed as CUDA-graph replays, so the host's launch overhead does
not hide the kernels' own speed; the eager-torch reference rows are timed as launched.

Bytes are counted as the minimum the operation must move: the high-precision input read
once plus every output written once (``useful``). The tensorwise recipe also reads the
input a second time (amax pass, then cast pass); ``actual_bytes`` counts that read, so
``useful_gbps / copy_gbps`` is the fraction of the copy's speed the user sees, and
``actual_gbps / copy_gbps`` is how well each pass uses the memory system.

    python -m benchmarks.bench_quant [--sweep-blocks]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import bench_ms, environment, warm_up_gpu, write_json
from hf_fp8.kernels import quant as K
from hf_fp8.kernels import quant_reference as R

SHAPES = [(8192, 4096), (8192, 14336), (4096, 14336), (14336, 4096)]
E4M3 = torch.float8_e4m3fn


def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def run(sweep_blocks: bool) -> list[dict]:
    warm_up_gpu()
    rows = []
    for R_, C_ in SHAPES:
        x = torch.randn(R_, C_, device="cuda", dtype=torch.bfloat16)
        n = x.numel()
        dst = torch.empty_like(x)
        copy = bench_ms(lambda: dst.copy_(x), cudagraph=True)
        copy_gbps = _gbps(4 * n, copy["ms"])
        rows.append(dict(kernel="copy", shape=[R_, C_], useful_bytes=4 * n, **copy, useful_gbps=copy_gbps))
        s = torch.tensor(1.0, device="cuda")
        slot = torch.zeros((), device="cuda")
        cases = {
            # name: (callable, useful bytes, actual bytes)
            "amax_pass_only": (lambda: K._launch_amax(x, -1), 2 * n, 2 * n),
            "tensorwise": (lambda: K.quantize_tensorwise(x, E4M3), 3 * n, 5 * n),
            "tensorwise+transpose": (lambda: K.quantize_tensorwise(x, E4M3, write_t=True), 4 * n, 6 * n),
            "delayed": (lambda: K.quantize_delayed(x, E4M3, s, slot), 3 * n, 3 * n),
            "delayed+transpose": (lambda: K.quantize_delayed(x, E4M3, s, slot, write_t=True), 4 * n, 4 * n),
            "rowwise": (lambda: K.quantize_rowwise(x, E4M3), 3 * n, 5 * n),
            "colwise_transposed": (lambda: K.quantize_colwise_transposed(x, E4M3), 3 * n, 5 * n),
            "torch_eager_tensorwise(reference)": (lambda: R.quantize_tensorwise_reference(x, E4M3), 3 * n, None),
            "torch_eager_tensorwise+transpose(reference)": (
                lambda: R.quantize_tensorwise_reference(x, E4M3, write_t=True),
                4 * n,
                None,
            ),
        }
        for name, (fn, useful, actual) in cases.items():
            t = bench_ms(fn, cudagraph=not name.startswith("torch_eager"))
            row = dict(kernel=name, shape=[R_, C_], useful_bytes=useful, **t)
            row["useful_gbps"] = _gbps(useful, t["ms"])
            row["useful_frac_of_copy"] = row["useful_gbps"] / copy_gbps
            if actual:
                row["actual_gbps"] = _gbps(actual, t["ms"])
                row["actual_frac_of_copy"] = row["actual_gbps"] / copy_gbps
            rows.append(row)
            print(
                f"{name:45s} {R_}x{C_}: {t['ms']:.3f} ms  useful {row['useful_gbps']:.0f} GB/s "
                f"({row['useful_frac_of_copy']:.2f} of copy {copy_gbps:.0f})",
                flush=True,
            )
        if sweep_blocks:
            default_tuning = dict(K.TUNING)
            for amax_block in [(16, 512, 8), (32, 512, 8), (8, 1024, 4), (32, 256, 4), (64, 256, 8)]:
                for per_sm in (2, 4, 8):
                    K.TUNING.update(amax=amax_block, programs_per_sm=(per_sm,))
                    t = bench_ms(lambda: K._launch_amax(x, -1))
                    rows.append(
                        dict(
                            kernel="sweep_amax",
                            shape=[R_, C_],
                            block=list(amax_block),
                            programs_per_sm=per_sm,
                            **t,
                            read_frac_of_copy=_gbps(2 * n, t["ms"]) / copy_gbps,
                        )
                    )
            K.TUNING.update(default_tuning)
            for block in [(32, 256, 4), (128, 64, 4), (128, 32, 4), (256, 32, 4), (64, 256, 8)]:
                for write_t in (False, True):
                    try:
                        t = bench_ms(lambda: K.quantize_tensorwise(x, E4M3, write_t=write_t, block=block))
                    except Exception as e:  # a config the compiler rejects is a data point, not a crash
                        rows.append(dict(kernel="sweep", block=block, write_t=write_t, error=str(e)[:200]))
                        continue
                    useful = (4 if write_t else 3) * n
                    rows.append(
                        dict(
                            kernel="sweep_tensorwise",
                            shape=[R_, C_],
                            block=list(block),
                            write_t=write_t,
                            **t,
                            useful_gbps=_gbps(useful, t["ms"]),
                            useful_frac_of_copy=_gbps(useful, t["ms"]) / copy_gbps,
                        )
                    )
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep-blocks", action="store_true", help="also time the cast kernel at several tile sizes")
    ap.add_argument("--out", default="quant_h100.json")
    args = ap.parse_args()
    rows = run(args.sweep_blocks)
    path = write_json(args.out, {"env": environment(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
