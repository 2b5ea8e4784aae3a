"""Markdown tables from benchmarks/results/*.json, and the README sections that show them.

python -m benchmarks.tables            # print the tables
python -m benchmarks.tables --update   # rewrite the marked sections of README.md and benchmarks/README.md
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROVIDER_ORDER = [
    "hf_fp8-tensorwise",
    "hf_fp8-delayed",
    "hf_fp8-rowwise",
    "hf_fp8-tensorwise-fastacc",
    "torchao-tensorwise",
    "torchao-rowwise",
    "torchao-tensorwise-compile",
    "torchao-rowwise-compile",
]


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _env_line(env: dict) -> str:
    return (
        f"{env.get('gpu', '?')}, torch {env.get('torch')}, triton {env.get('triton')}, torchao {env.get('torchao')}, "
        f"git {str(env.get('git_sha'))[:7]}"
    )


def linear_table() -> str:
    data = _load("linear_h100.json")
    rows = [r for r in data["rows"] if "ms" in r]
    shapes = []
    for r in rows:
        if (r["K"], r["N"]) not in shapes:
            shapes.append((r["K"], r["N"]))
    provs = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in rows)]
    head = (
        "| K -> N | BF16 ms | "
        + " | ".join(p.replace("hf_fp8-", "hf_fp8 ").replace("torchao-", "torchao ") for p in provs)
        + " |"
    )
    out = [
        f"Fp8Linear fwd+bwd, M={data['M']}, speedup over BF16 nn.Linear (higher is better). {_env_line(data['env'])}.",
        "",
        head,
        "|" + "---|" * (len(provs) + 2),
    ]
    for k, n in shapes:
        by = {r["provider"]: r for r in rows if (r["K"], r["N"]) == (k, n)}
        cells = [f"{by[p]['speedup_vs_bf16']:.2f}x" if p in by else "-" for p in provs]
        out.append(f"| {k} -> {n} | {by['bf16']['ms']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def sweep_table(provider: str = "hf_fp8-tensorwise") -> str:
    data = _load("linear_sweep_h100.json")
    rows = {(r["K"], r["N"]): r["speedup_vs_bf16"] for r in data["rows"] if r.get("provider") == provider and "ms" in r}
    ks = sorted({k for k, _ in rows})
    ns = sorted({n for _, n in rows})
    out = [
        f"{provider} fwd+bwd speedup over BF16 at M={data['M']}, rows K (in), columns N (out). {_env_line(data['env'])}.",
        "",
        "| K \\ N | " + " | ".join(map(str, ns)) + " |",
        "|" + "---|" * (len(ns) + 1),
    ]
    for k in ks:
        out.append(f"| {k} | " + " | ".join(f"{rows[(k, n)]:.2f}" for n in ns) + " |")
    return "\n".join(out)


def quant_table() -> str:
    data = _load("quant_h100.json")
    rows = [r for r in data["rows"] if "useful_gbps" in r and not r["kernel"].startswith("sweep")]
    shapes = []
    for r in rows:
        if tuple(r["shape"]) not in shapes:
            shapes.append(tuple(r["shape"]))
    kernels = []
    for r in rows:
        if r["kernel"] != "copy" and r["kernel"] not in kernels:
            kernels.append(r["kernel"])
    out = [
        f"BF16 input -> FP8, useful bytes (input read once + outputs written once) per second as a fraction of a "
        f"device-to-device copy's. {_env_line(data['env'])}.",
        "",
        "| kernel | " + " | ".join(f"{a}x{b}" for a, b in shapes) + " |",
        "|" + "---|" * (len(shapes) + 1),
    ]
    for kname in kernels:
        cells = []
        for s in shapes:
            r = next((r for r in rows if r["kernel"] == kname and tuple(r["shape"]) == s), None)
            cells.append(f"{r['useful_frac_of_copy']:.2f} ({r['ms'] * 1e3:.0f} us)" if r else "-")
        out.append(f"| {kname} | " + " | ".join(cells) + " |")
    copies = [next(r for r in rows if r["kernel"] == "copy" and tuple(r["shape"]) == s) for s in shapes]
    out.append("| copy GB/s | " + " | ".join(f"{c['useful_gbps']:.0f}" for c in copies) + " |")
    return "\n".join(out)


def precision_table() -> str:
    rope = _load("rope_h100.json")
    ops = _load("precision_ops_h100.json")
    out = [
        f"RoPE, B=2, S=4096, 32/8 heads, head_dim 128, BF16, rope_theta=500000. {_env_line(rope['env'])}.",
        "",
        "| provider | fwd ms | fwd+bwd ms, per layer of an 8-layer graph | vs HF | fwd+bwd ms, one op per backward() "
        "| same, backward on the calling thread | device time (CUDA graph) | vs HF | outputs correctly rounded |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rope["rows"] if r["op"] == "rope"):
        out.append(
            f"| {r['provider']} | {r['fwd_ms']:.3f} | {r['per_layer_fwd_bwd_ms']:.3f} | "
            f"{r['per_layer_fwd_bwd_speedup_vs_hf']:.2f}x | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_ms_calling_thread']:.3f} | "
            f"{r['device_fwd_bwd_ms']:.3f} | {r['device_fwd_bwd_speedup_vs_hf']:.2f}x | {r['frac_correctly_rounded']:.4f} |"
        )
    out += [
        "",
        f"Loss, B=2, S=4096, hidden 4096, vocab 128256, BF16 operands, fwd+bwd. {_env_line(ops['env'])}.",
        "",
        "| provider | ms | vs HF | peak memory GB | vs HF | loss |",
        "|---|---|---|---|---|---|",
    ]
    for r in (r for r in ops["rows"] if r["op"] == "loss"):
        out.append(
            f"| {r['provider']} | {r['fwd_bwd_ms']:.1f} | {r['time_vs_hf']:.2f}x | {r['peak_mem_gb']:.2f} | "
            f"{r['mem_vs_hf']:.2f}x | {r['loss']:.6f} |"
        )
    out += [
        "",
        "AdamW step, the 872M parameters of 4 Llama-3-8B decoder layers.",
        "",
        "| optimizer | step ms | vs torch fused (BF16 params) |",
        "|---|---|---|",
    ]
    for r in (r for r in ops["rows"] if r["op"] == "adamw"):
        out.append(f"| {r['provider']} | {r['step_ms']:.2f} | {r['time_vs_torch_fused_bf16']:.2f}x |")
    return "\n".join(out)


def lora_table() -> str:
    data = _load("lora_h100.json")
    rows = [r for r in data["rows"] if "error" not in r]
    r0 = rows[0]
    out = [
        f"LoRA r=16 on q/k/v/o/gate/up/down (FP32 adapters), {r0['layers']}-layer Llama with Llama-3-8B shapes, "
        f"B={r0['batch']}, S={r0['seq']}, BF16 model, tensorwise recipe with the default filter. "
        f"{_env_line(data['env'])}.",
        "",
        "| variant | LoRA-targeted base weights GB | vs stock | all frozen params GB | vs stock | peak GB | vs stock "
        "| step ms | speedup | loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['variant']} | {r['targeted_base_weight_gb']:.2f} | {r['targeted_base_weight_vs_stock']:.2f}x | "
            f"{r['frozen_param_gb']:.2f} | {r['frozen_param_vs_stock']:.2f}x | {r['peak_mem_gb']:.1f} | "
            f"{r['peak_mem_vs_stock']:.2f}x | {r['step_ms']:.1f} | {r['speedup_vs_stock']:.2f}x | {r['loss']:.4f} |"
        )
    return "\n".join(out)


def attention_table() -> str:
    data = _load("attention_h100.json")
    rows = [r for r in data["rows"] if r.get("kind") == "attention" and "error" not in r]
    out = [
        "Attention, B=2, 32 query / 8 KV heads, head_dim 128, causal, BF16 inputs; our kernel's tiles "
        f"{tuple(data['tuning'])} (BLOCK_M, BLOCK_N, warps, stages) from a sweep in the same run. "
        f"{_env_line(data['env'])}.",
        "",
        "| S | provider | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | error vs float64 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['S']} | {r['provider']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | {r['fwd_bwd_ms']:.3f} | "
            f"{r['fwd_bwd_tflops']:.0f} | {r['rel_err_vs_fp64']:.4f} |"
        )
    return "\n".join(out)


def monitor_table() -> str:
    d = _load("monitor_h100.json")
    t = d["step_ms"]
    return "\n".join(
        [
            f"FP8 health monitor, {d['layers']}-layer Llama with Llama-3-8B shapes, B={d['batch']}, S={d['seq']}, "
            f"{d['fp8_layers']} FP8 layers, fused AdamW. {_env_line(d['env'])}.",
            "",
            "| monitor | step ms (median) | vs off |",
            "|---|---|---|",
            f"| off | {t['off']['median']:.1f} | 1.000x |",
            f"| idle (not a sampled step) | {t['idle']['median']:.1f} | {t['idle']['median'] / t['off']['median']:.3f}x |",
            f"| sampled step, FP8 layers | {t['sampled']['median']:.1f} | "
            f"{t['sampled']['median'] / t['off']['median']:.3f}x |",
            f"| sampled step, every nn.Linear | {t['sampled_all_linear']['median']:.1f} | "
            f"{t['sampled_all_linear']['median'] / t['off']['median']:.3f}x |",
            "",
            f"Amortized at the default interval ({d['interval']}): **{d['overhead_pct']:.2f}%** of step time "
            f"({d['overhead_all_linear_pct']:.2f}% monitoring every nn.Linear).",
        ]
    )


def llama_table(name: str = "llama_h100.json") -> str:
    d = _load(name)
    rows = [r for r in d["rows"] if "speedup_vs_stock" in r]
    cfg = rows[0]["config"]
    out = [
        f"HF Llama training step, {cfg} config ({d['configs'][cfg]['num_hidden_layers']} layers, hidden "
        f"{d['configs'][cfg]['hidden_size']}), B={d['batch']}, S={d['seq']}, BF16 params, median of {d['steps']} "
        f"steps after {d['warmup']}. {_env_line(d['env'])}.",
        "",
        "| variant | FP8 layers | tokens/s | vs stock BF16 | peak GB | vs stock | loss after the timed steps |",
        "|---|---|---|---|---|---|---|",
    ]
    if any(r["variant"].endswith("_graph") for r in rows):
        out[0] += (
            " `_graph`: forward and backward replayed as one CUDA graph (`hf_fp8.CudaGraphStep`); its peak"
            " is the memory reserved (the graph's pool), the others' the memory allocated."
        )
    for r in rows:
        layers = r["note"].split(" FP8 layers")[0].split(";")[0]
        out.append(
            f"| {r['variant']} | {layers or '-'} | {r['tokens_per_s']:.0f} | "
            f"{r['speedup_vs_stock']:.2f}x | {r['peak_mem_gb']:.1f} | {r['mem_vs_stock']:.2f}x | {r['loss']:.4f} |"
        )
    return "\n".join(out)


def adamw_table() -> str:
    d = _load("adamw_h100.json")
    out = [
        f"AdamW step over the {d['params'] / 1e9:.2f} B BF16 parameters of an {d['layers']}-layer Llama-3-8B-shaped "
        "model (median of 10 steps, CUDA events; bandwidth from the bytes each step must move). "
        f"{_env_line(d['env'])}.",
        "",
        "| optimizer | states | kernel block x warps | step ms | TB/s | vs torch fused | host ms per step() |",
        "|---|---|---|---|---|---|---|",
    ]
    from hf_fp8.kernels import adamw as kernel

    for r in d["rows"]:
        if r["block"] not in (None, kernel.BLOCK) or r["num_warps"] not in (None, kernel.NUM_WARPS):
            continue  # the sweep's other settings: in the JSON
        states = "FP32" if r["bytes_per_param"] > 14 else "BF16"
        setting = "-" if r["block"] is None else f"{r['block']} x {r['num_warps']}"
        out.append(
            f"| {r['variant']} | {states} | {setting} | {r['step_ms']:.2f} | {r['tb_per_s']:.2f} | "
            f"{r['speedup_vs_torch_fused']:.2f}x | {r['host_ms']:.2f} |"
        )
    return "\n".join(out)


def llama_profile_table(name: str = "llama_profile_h100.json") -> str:
    d = _load(name)
    rows = [r for r in d["rows"] if "category_ms" in r]
    cats = sorted(
        {c for r in rows for c in r["category_ms"]}, key=lambda c: -max(r["category_ms"].get(c, 0) for r in rows)
    )
    out = [
        f"GPU time of one training step by kernel category (ms per step, torch.profiler, {d['config']} config, "
        f"B={d['batch']}, S={d['seq']}, mean of {d['steps']} steps). {_env_line(d['env'])}.",
        "",
        "| | " + " | ".join(r["variant"] for r in rows) + " |",
        "|---" * (len(rows) + 1) + "|",
        "| step (wall) | " + " | ".join(f"{r['wall_ms']:.1f}" for r in rows) + " |",
        "| GPU busy | " + " | ".join(f"{r['gpu_busy_ms']:.1f}" for r in rows) + " |",
    ]
    for c in cats:
        out.append(f"| {c} | " + " | ".join(f"{r['category_ms'].get(c, 0.0):.1f}" for r in rows) + " |")
    out += [
        "| kernels per step | " + " | ".join(f"{r['kernels_per_step']:.0f}" for r in rows) + " |",
        "| host syncs in the profiled steps | " + " | ".join(str(sum(r["host_syncs"].values())) for r in rows) + " |",
        "| memory before the step (params + optimizer) GB | "
        + " | ".join(f"{r['static_mem_gb']:.1f}" for r in rows)
        + " |",
        "| peak GB | " + " | ".join(f"{r['peak_mem_gb']:.1f}" for r in rows) + " |",
    ]
    return "\n".join(out)


SECTIONS = {
    "adamw": adamw_table,
    "llama_profile": llama_profile_table,
    "llama_e2e": lambda: llama_table("llama_e2e_h100.json"),
    "llama_e2e_more": lambda: llama_table("llama_e2e_more_h100.json"),
    "llama_resemb": lambda: llama_table("llama_resemb_h100.json"),
    "llama_accept_end": lambda: llama_table("llama_accept_end_h100.json"),
    "llama_defer": lambda: llama_table("llama_defer_h100.json"),
    "llama_accept_defer": lambda: llama_table("llama_accept_defer_h100.json"),
    "llama_accept_defer2": lambda: llama_table("llama_accept_defer2_h100.json"),
    "llama_accept_defer3": lambda: llama_table("llama_accept_defer3_h100.json"),
    "llama_accept_final": lambda: llama_table("llama_accept_final_h100.json"),
    "llama_1b": lambda: llama_table("llama_1b_h100.json"),
    "llama_graph": lambda: llama_table("llama_graph_h100.json"),
    "llama_graph_1b": lambda: llama_table("llama_graph_1b_h100.json"),
    "llama": llama_table,
    "llama_fused": lambda: llama_table("llama_fused_h100.json"),
    "monitor": monitor_table,
    "attention": attention_table,
    "linear": linear_table,
    "sweep": sweep_table,
    "quant": quant_table,
    "precision": precision_table,
    "lora": lora_table,
}


def render(text: str) -> str:
    for name, fn in SECTIONS.items():
        pattern = re.compile(rf"(<!-- bench:{name} -->\n)(?:.*?\n)?(<!-- /bench:{name} -->)", re.S)
        text = pattern.sub(lambda m, fn=fn: m.group(1) + fn() + "\n" + m.group(2), text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--update", action="store_true")
    args = ap.parse_args()
    if args.update:
        for path in (ROOT / "README.md", ROOT / "benchmarks" / "README.md"):
            path.write_text(render(path.read_text()))
            print(f"updated {path}")
    else:
        for fn in SECTIONS.values():
            print(fn(), end="\n\n")


if __name__ == "__main__":
    main()
