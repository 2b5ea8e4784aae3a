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


def _env_line(env: dict, sha: bool = True) -> str:
    line = f"{env.get('gpu', '?')}, torch {env.get('torch')}, triton {env.get('triton')}, torchao {env.get('torchao')}"
    return line + (f", git {str(env.get('git_sha'))[:7]}" if sha else "")


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


def lora_table(name: str = "lora_h100.json", base: str = "tensorwise recipe with the default filter") -> str:
    data = _load(name)
    rows = [r for r in data["rows"] if "error" not in r]
    r0 = rows[0]
    out = [
        f"LoRA r=16 on q/k/v/o/gate/up/down (FP32 adapters), {r0['layers']}-layer Llama with Llama-3-8B shapes, "
        f"B={r0['batch']}, S={r0['seq']}, BF16 model, {base}. "
        f"{_env_line(data['env'])}; `{name}`.",
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


def llama_table(name: str) -> str:
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
            f"| {_NAMES.get(r['variant'], r['variant'])} | {layers or '-'} | {r['tokens_per_s']:.0f} | "
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


_NAMES = {
    "stock_bf16": "stock BF16 (HF, torch fused AdamW)",
    "stock_bf16_hfadamw": "stock BF16 + hf_fp8.optim.AdamW",
    "hf_fp8": "**hf_fp8 default** (`Fp8Config()`: delayed)",
    "hf_fp8_tensorwise": "hf_fp8 tensorwise",
    "hf_fp8_rowwise": "hf_fp8 rowwise",
    "hf_fp8_delayed": "hf_fp8 delayed",
    "hf_fp8_full_bf16": "hf_fp8 full-BF16 (no FP8)",
    "hf_fp8_all": "hf_fp8 delayed, every decoder linear",
    "hf_fp8_tensorwise_all": "hf_fp8 tensorwise, every decoder linear",
    "hf_fp8_rowwise_all": "hf_fp8 rowwise, every decoder linear",
    "torchao_tensorwise_compile": "torchao float8 tensorwise + torch.compile",
    "torchao_rowwise_compile": "torchao float8 rowwise + torch.compile",
    "liger": "Liger-Kernel",
    "hf_fp8_fp8attn": "hf_fp8 default + FP8 attention",
    "hf_fp8_recomputeall": "hf_fp8 default, every layer recomputed (`keep_activations=0`)",
    "hf_fp8_blockwise": "hf_fp8 blockwise",
    "hf_fp8_blockwise_all": "hf_fp8 blockwise, every decoder linear",
}


def e2e_table(name: str = "llama_e2e_h100.json") -> str:
    """The README's performance table: one run, each variant in its own process."""
    d = _load(name)
    rows = [r for r in d["rows"] if "speedup_vs_stock" in r]
    cfg = rows[0]["config"]
    c = d["configs"][cfg]
    best_peer = min((r for r in rows if r["variant"].startswith(("torchao", "liger"))), key=lambda r: r["step_ms"])
    out = [
        f"Training step of Llama-3-8B layer shapes ({c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
        f"MLP {c['intermediate_size']}, vocab {c['vocab_size']}), B={d['batch']}, S={d['seq']}, BF16 parameters, "
        f"median of {d['steps']} steps after {d['warmup']}; {_env_line(d['env'], sha=False)}, {d['env']['timestamp'][:10]}; "
        f"`{name}`.",
        "",
        "| variant | FP8 layers | ms / step | vs stock BF16 | vs best peer | peak GB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        layers = r["note"].split(" FP8 layers")[0] if "FP8 layers" in r["note"] else "-"
        out.append(
            f"| {_NAMES.get(r['variant'], r['variant'])} | {layers} | {r['step_ms']:.1f} | "
            f"{r['speedup_vs_stock']:.2f}x | {best_peer['step_ms'] / r['step_ms']:.2f}x | {r['peak_mem_gb']:.1f} |"
        )
    return "\n".join(out)


def _steps_behind(losses: list[float], base: list[float], window: int) -> int:
    """How many steps before its end the baseline's mean loss over ``window`` steps had already come
    down to ``losses``' final mean: while the loss falls fast, a small delay shows as a large gap."""
    target = sum(losses[-window:]) / window
    for behind in range(len(base) - window + 1):
        end = len(base) - behind
        if sum(base[end - window : end]) / window >= target:
            return behind
    return len(base) - window


def loss_table(name: str = "llama_1b_loss_h100.json") -> str:
    """FP8 against BF16 over a few hundred steps: mean loss of the last steps, the same AdamW. With
    several seeds, one column per seed (each against BF16 of the same seed) and the mean of those."""
    d = _load(name)
    rows = [r for r in d["rows"] if "mean_loss_last" in r]
    seeds = sorted({r.get("seed", 0) for r in rows})
    base = {s: next(r for r in rows if r.get("seed", 0) == s and r["variant"].startswith("stock_bf16")) for s in seeds}
    cfg = rows[0]["config"]
    out = [
        f"{d['steps'] + d['warmup']} steps of the bigram stream at Llama-3.2-1B shapes ({cfg}), B={d['batch']}, "
        f"S={d['seq']}, lr {d['lr']:g}, each with hf_fp8.optim.AdamW (stochastic rounding); mean loss of the last "
        f"{d['loss_window']} steps"
        + (f"; seeds {', '.join(map(str, seeds))} (initialization and data)" if len(seeds) > 1 else "")
        + f"; {_env_line(d['env'])}; `{name}`.",
        "",
    ]
    if len(seeds) == 1:
        out += ["| variant | ms / step | mean loss, last steps | vs BF16 |", "|---|---|---|---|"]
        for r in rows:
            out.append(
                f"| {_NAMES.get(r['variant'], r['variant'])} | {r['step_ms']:.1f} | {r['mean_loss_last']:.4f} | "
                f"{r['mean_loss_last'] / base[seeds[0]]['mean_loss_last'] - 1:+.2%} |"
            )
        return "\n".join(out)
    out += [
        "| variant | ms / step | "
        + " | ".join(f"seed {s}: loss (vs BF16)" for s in seeds)
        + " | mean vs BF16 | steps behind BF16 |",
        "|---|---|" + "---|" * len(seeds) + "---|---|",
    ]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        by_seed = {r.get("seed", 0): r for r in rows if r["variant"] == variant}
        deltas = {s: r["mean_loss_last"] / base[s]["mean_loss_last"] - 1 for s, r in by_seed.items()}
        times = sorted(r["step_ms"] for r in by_seed.values())
        cells = [f"{by_seed[s]['mean_loss_last']:.4f} ({deltas[s]:+.2%})" if s in by_seed else "not run" for s in seeds]
        behind = [_steps_behind(r["losses"], base[s]["losses"], d["loss_window"]) for s, r in sorted(by_seed.items())]
        out.append(
            f"| {_NAMES.get(variant, variant)} | {times[len(times) // 2]:.1f} | {' | '.join(cells)} | "
            f"{sum(deltas.values()) / len(deltas):+.2%} | {', '.join(map(str, behind))} |"
        )
    return "\n".join(out)


_FAMILY_NAMES = {"8b": "Llama-3-8B", "qwen2.5-7b": "Qwen2.5-7B", "qwen3-8b": "Qwen3-8B", "mistral-7b": "Mistral-7B"}


def families_table(name: str = "families_h100.json") -> str:
    """Each model family's layer shapes: the default recipe and torchao against stock, in one run."""
    d = _load(name)
    by = {(r["config"], r["variant"]): r for r in d["rows"] if "step_ms" in r}
    configs = [c for c in d["configs"] if (c, "stock_bf16") in by]
    llama = by.get(("8b", "hf_fp8"))
    out = [
        f"Training step, {d['configs'][configs[0]]['num_hidden_layers']} layers of each model's shapes, B={d['batch']}, "
        f"S={d['seq']}, BF16 parameters, median of {d['steps']} steps after {d['warmup']}, each variant in its own "
        f"process; {_env_line(d['env'], sha=False)}; `{name}`.",
        "",
        "| model shapes | stock BF16 ms | hf_fp8 default ms | vs stock | vs Llama's speed-up | torchao tensorwise + "
        "compile ms | vs stock | hf_fp8 vs torchao |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        stock, ours, ao = (by.get((c, v)) for v in ("stock_bf16", "hf_fp8", "torchao_tensorwise_compile"))
        sp = stock["step_ms"] / ours["step_ms"] if ours else None
        rel = f"{sp / (by[('8b', 'stock_bf16')]['step_ms'] / llama['step_ms']):.2f}" if (sp and llama) else "-"
        out.append(
            f"| {_FAMILY_NAMES.get(c, c)} | {stock['step_ms']:.1f} | "
            + (f"{ours['step_ms']:.1f} | {sp:.2f}x | {rel} | " if ours else "- | - | - | ")
            + (f"{ao['step_ms']:.1f} | {stock['step_ms'] / ao['step_ms']:.2f}x | " if ao else "- | - | ")
            + (f"{ao['step_ms'] / ours['step_ms']:.2f}x |" if (ao and ours) else "- |")
        )
    return "\n".join(out)


def full8b_table(name: str = "llama_8b_full_ckpt_h100.json") -> str:
    """The whole Llama-3-8B on one GPU with activation checkpointing: the default (selective
    recompute) and every layer recomputed, against stock and the peers, in one run."""
    d = _load(name)
    rows = [r for r in d["rows"] if "step_ms" in r]
    stock = next(r for r in rows if r["variant"] == "stock_bf16")
    ao = next((r for r in rows if r["variant"] == "torchao_tensorwise_compile"), None)
    out = [
        f"The whole Llama-3-8B (32 layers), B={d['batch']}, S={d['seq']}, HF activation checkpointing, BF16 parameters, "
        f"median of {d['steps']} steps after {d['warmup']}, each variant in its own process; "
        f"{_env_line(d['env'], sha=False)}; `{name}`.",
        "",
        "| variant | ms / step | vs stock BF16 | vs torchao + compile | peak GB allocated | recompute |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        kept = r["note"].split("kept activations: ")[1].split(" (")[0] if "kept activations: " in r["note"] else None
        recompute = f"{kept} kept their activations, the rest recomputed" if kept else "every layer recomputed"
        vs_ao = f"{ao['step_ms'] / r['step_ms']:.2f}x" if ao else "-"
        out.append(
            f"| {_NAMES.get(r['variant'], r['variant'])} | {r['step_ms']:.1f} | {stock['step_ms'] / r['step_ms']:.2f}x | "
            f"{vs_ao} | {r['peak_allocated_gb']:.2f} | {recompute} |"
        )
    return "\n".join(out)


def padded_table(name: str = "llama_8b_full_ckpt_padded_h100.json") -> str:
    """Padded SFT batches on the whole 8B: FP8 attention (taking the padding mask) against SDPA."""
    d = _load(name)
    rows = [r for r in d["rows"] if "step_ms" in r]
    base = next(r for r in rows if r["variant"] == "stock_bf16")
    out = [
        f"The whole Llama-3-8B, B={d['batch']}, S={d['seq']}, {d['pad_frac']:.0%} padding (right-padded, attention "
        f"mask, labels -100), activation checkpointing, median of {d['steps']} steps after {d['warmup']}, each "
        f"variant in its own process; {_env_line(d['env'], sha=False)}; `{name}`.",
        "",
        "| variant | ms / step | vs stock BF16 | real tokens / s | peak GB | attention |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        attention = r["note"].split("attention: ")[1].split(";")[0] if "attention: " in r["note"] else "SDPA"
        out.append(
            f"| {_NAMES.get(r['variant'], r['variant'])} | {r['step_ms']:.1f} | {base['step_ms'] / r['step_ms']:.2f}x | "
            f"{r['tokens_per_s']:.0f} | {r['peak_mem_gb']:.1f} | {attention} |"
        )
    return "\n".join(out)


SECTIONS = {
    "e2e": e2e_table,
    "families": families_table,
    "full8b": full8b_table,
    "lora_published": lambda: lora_table(
        "lora_published_h100.json", "LoRA-targeted layers as a 128x128-block FP8 checkpoint's frozen codes"
    ),
    "padded": padded_table,
    "blockwise_e2e": lambda: llama_table("blockwise_e2e_h100.json"),
    "blockwise_loss": lambda: loss_table("blockwise_1b_loss_h100.json"),
    "loss": loss_table,
    "adamw": adamw_table,
    "attention": attention_table,
    "linear": linear_table,
    "sweep": sweep_table,
    "quant": quant_table,
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
        for name, fn in SECTIONS.items():
            try:
                print(fn(), end="\n\n")
            except FileNotFoundError as e:
                print(f"({name}: no results file yet: {e.filename})\n")


if __name__ == "__main__":
    main()
