"""The FP8 casts that write a transposed copy, by what crosses shared memory and by tile.

Every transposed copy the Llama-3-8B step writes (B=2, S=4096): the inputs of q/k/v, o and
gate/up (both copies, delayed scaling), the gradients of o, q, k, v and down (both copies),
the SwiGLU-fused gate/up gradients (four copies), and the re-casts that write only the
transposed copy (the weights for the input-gradient GEMM, down's input from gate/up). For
each ``TUNING['cast_t_mode']`` (see ``kernels/quant.py:_saturate_and_store``) and tile, the
time of a CUDA-graph replay and whether its codes equal mode 0's at the default tile bit
for bit. A device-to-device copy of the input gives the bandwidth to compare with.

    python -m benchmarks.bench_cast_transpose [--out cast_transpose_h100.json]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import bench_ms, environment, warm_up_gpu, write_json
from hf_fp8.kernels import quant as K
from hf_fp8.kernels.swiglu_quant import swiglu_backward_quantize

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
TILES = [(128, 64, 4), (64, 64, 4), (128, 128, 8), (64, 128, 4), (128, 64, 8), (256, 64, 8), (64, 256, 8)]
MODES = (0, 1, 2)


def _cases() -> dict:
    """name: (callable(block) -> outputs, bytes moved at least, calls per step of the 8-layer model)."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(torch.bfloat16)

    s, slot = torch.tensor(20.0, device="cuda"), torch.zeros((), device="cuda")
    x4k, x1k, x14k = rnd(8192, 4096), rnd(8192, 1024, scale=1e-3), rnd(8192, 14336)
    up14k = rnd(8192, 14336)
    d14k = rnd(8192, 14336, scale=1e-3)
    w = {(14336, 4096): rnd(14336, 4096, scale=0.02), (4096, 14336): rnd(4096, 14336, scale=0.02)}
    w |= {(4096, 4096): rnd(4096, 4096, scale=0.02), (1024, 4096): rnd(1024, 4096, scale=0.02)}
    cases = {
        # activations / output gradients, both copies (delayed: the scale is given, the amax recorded)
        # per layer: the q/k/v and gate/up inputs, the o, q and down gradients
        "both_8192x4096": (
            lambda b: K.quantize_delayed(x4k, E4M3, s, slot, write_t=True, block=b),
            4 * x4k.numel(),
            5 * 8,
        ),
        # o's input: rows in the forward, the transposed copy re-cast from the kept input in the backward
        "t_only_8192x4096": (lambda b: K.quantize_with_scale(x4k, E4M3, s, block=b), 3 * x4k.numel(), 8),
        "both_8192x1024": (
            lambda b: K.quantize_delayed(x1k, E5M2, s, slot, write_t=True, block=b),
            4 * x1k.numel(),
            2 * 8,
        ),
        "swiglu_grads_8192x14336": (
            lambda b: swiglu_backward_quantize(
                d14k, x14k, up14k, E5M2, scales=(s, s), amax_slots=(slot, slot), block=b
            ),
            10 * x14k.numel(),
            8,
        ),
        # down's input re-cast from gate/up, the weights' transposes
        "t_only_gated_8192x14336": (
            lambda b: K.quantize_with_scale(x14k, E4M3, s, write_y=False, write_t=True, swiglu_up=up14k, block=b),
            5 * x14k.numel(),
            8,
        ),
    }
    for shape, t in w.items():
        calls = {(14336, 4096): 16, (4096, 14336): 8, (4096, 4096): 16, (1024, 4096): 16}[shape]
        cases[f"t_only_weight_{shape[0]}x{shape[1]}"] = (
            lambda b, t=t: K.quantize_with_scale(t, E4M3, s, write_y=False, write_t=True, block=b),
            3 * t.numel(),
            calls,
        )
    return cases


def _codes(out) -> list[torch.Tensor]:
    outs = [out] if isinstance(out, K.Fp8Quantized) else out
    return [t for q in outs for t in (q.data, q.data_t) if t is not None]


def run() -> list[dict]:
    warm_up_gpu()
    rows = []
    default_mode, default_tile = K.TUNING["cast_t_mode"], K.TUNING["cast_t"]
    src = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy = bench_ms(lambda: dst.copy_(src), cudagraph=True)
    copy_gbps = 4 * src.numel() / (copy["ms"] * 1e-3) / 1e9
    rows.append(dict(case="copy_8192x4096", **copy, gbps=copy_gbps))
    print(f"copy: {copy_gbps:.0f} GB/s", flush=True)
    try:
        for name, (fn, nbytes, calls) in _cases().items():
            K.TUNING["cast_t_mode"] = (0,)
            want = [t.clone() for t in _codes(fn(default_tile))]
            for mode in MODES:
                K.TUNING["cast_t_mode"] = (mode,)
                for tile in TILES:
                    try:
                        same = all(
                            torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                            for a, b in zip(_codes(fn(tile)), want)
                        )
                        t = bench_ms(lambda: fn(tile), cudagraph=True)
                    except Exception as e:  # a tile the compiler rejects is a data point
                        rows.append(dict(case=name, mode=mode, tile=list(tile), error=str(e)[:200]))
                        continue
                    gbps = nbytes / (t["ms"] * 1e-3) / 1e9
                    rows.append(
                        dict(case=name, mode=mode, tile=list(tile), same_codes=same, **t, gbps=gbps,
                             frac_of_copy=gbps / copy_gbps, calls_per_step=calls)
                    )  # fmt: skip
                    print(f"{name:28s} mode {mode} tile {tile}: {t['ms'] * 1e3:7.1f} us  "
                          f"{gbps / copy_gbps:.2f} of copy  same={same}", flush=True)  # fmt: skip
            torch.cuda.empty_cache()
    finally:
        K.TUNING["cast_t_mode"] = default_mode
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per mode and tile, the step's total over every case (calls per step x time), and the best."""
    ok = [r for r in rows if "ms" in r and "mode" in r]
    total: dict[tuple, float] = {}
    valid: dict[tuple, bool] = {}
    for r in ok:
        key = (r["mode"], tuple(r["tile"]))
        total[key] = total.get(key, 0.0) + r["ms"] * r["calls_per_step"]
        valid[key] = valid.get(key, True) and r["same_codes"]
    cases = {r["case"] for r in ok}
    complete = {
        k: v
        for k, v in total.items()
        if valid[k] and sum(1 for r in ok if (r["mode"], tuple(r["tile"])) == k) == len(cases)
    }
    per_case_best = {}
    for c in cases:
        cand = [r for r in ok if r["case"] == c and r["same_codes"]]
        best = min(cand, key=lambda r: r["ms"])
        per_case_best[c] = dict(mode=best["mode"], tile=best["tile"], ms=best["ms"], frac_of_copy=best["frac_of_copy"])
    best_key = min(complete, key=complete.get) if complete else None
    return dict(
        step_ms_by_setting={f"mode{k[0]}_{'x'.join(map(str, k[1]))}": v for k, v in sorted(total.items())},
        best_setting=dict(mode=best_key[0], tile=list(best_key[1]), step_ms=complete[best_key]) if best_key else None,
        current_setting_step_ms=total.get((K.TUNING["cast_t_mode"][0], tuple(K.TUNING["cast_t"]))),
        per_case_best=per_case_best,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="cast_transpose_h100.json")
    args = ap.parse_args()
    rows = run()
    summary = summarize(rows)
    print(summary["best_setting"], summary["current_setting_step_ms"])
    path = write_json(args.out, {"env": environment(), "summary": summary, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
