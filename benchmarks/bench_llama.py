"""End-to-end training throughput of an HF Llama (or Qwen2.5, Qwen3, Mistral) on the H100: stock BF16, Liger, torch.compile,
torchao float8 and hf_fp8, side by side in one run, each variant in its own process (--isolate).

    python -m benchmarks.bench_llama --isolate --out llama_e2e_h100.json           # the README's table
    python -m benchmarks.bench_llama --isolate --configs 1b --steps 300 --warmup 3 --loss-window 50 \
        --seeds 0 1 2 --variants stock_bf16_hfadamw hf_fp8_all ... --out llama_1b_loss_h100.json  # loss vs BF16
    python -m benchmarks.bench_llama --isolate --configs 8b-full --batch 1 --checkpointing   # whole 8B
    python -m benchmarks.bench_llama --isolate --configs 8b-full --batch 1 --checkpointing --pad-frac 0.25 \
        --variants stock_bf16 hf_fp8 hf_fp8_fp8attn ...                                    # padded SFT batches
    python -m benchmarks.bench_llama --isolate --configs 8b qwen2.5-7b qwen3-8b mistral-7b \
        --variants stock_bf16 hf_fp8 torchao_tensorwise_compile                            # model families

Models (random init, BF16 parameters, SDPA attention): Llama-3-8B layer shapes with 8 layers
("8b": hidden 4096, MLP 14336, 32/8 heads, vocab 128256), the whole Llama-3-8B ("8b-full"), and
Llama-3.2-1B ("1b": hidden 2048, MLP 8192, 16 layers, 32/8 heads, tied embeddings), and 8 layers of
Qwen2.5-7B, Qwen3-8B and Mistral-7B ("qwen2.5-7b", "qwen3-8b", "mistral-7b"). B=2, S=4096
by default; every step a new batch drawn from a fixed random bigram chain (90% of tokens follow
it), the same batches for every variant: learnable but not memorizable, so the losses compare
training. Optimizer: torch's fused AdamW (BF16 states, as stock BF16 training does) for the
peers; hf_fp8 variants use what hf_fp8.Trainer builds (see build()). Per variant: tokens/s from
the median step time after warm-up, peak memory, every step's loss, ratios to stock BF16.
Variants that fail are recorded with their error; the run stops adding variants when the time
budget is spent and says which were skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

CONFIGS = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # the whole Llama-3-8B (fits one 80 GB GPU with activation checkpointing at B=1, S=4096)
    "8b-full": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    # other families' layer shapes, 8 layers each (hf_fp8's family table): q/k/v biases (Qwen2.5),
    # q/k norms and head_dim 128 (Qwen3), rope_theta 1e6 (all three)
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=8,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                       rope_theta=1e6),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=8,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=False, rope_theta=1e6),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=8,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, tie_word_embeddings=False,
                       rope_theta=1e6, sliding_window=None),
}  # fmt: skip
# model_type -> (transformers config class, causal-LM class, Liger's patch function)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "apply_liger_kernel_to_llama"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "apply_liger_kernel_to_qwen2"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "apply_liger_kernel_to_qwen3"),
    "mistral": ("MistralConfig", "MistralForCausalLM", "apply_liger_kernel_to_mistral"),
}

# Liger last: apply_liger_kernel_to_llama patches transformers' Llama classes for the whole
# process (RMSNorm, SwiGLU, RoPE, loss), so every model built after it would run Liger's kernels
# (measured: hf_fp8 delayed 1.13x -> 1.29x when built after the Liger variant).
VARIANTS = [
    "stock_bf16",
    "hf_fp8",  # the default recipe (Fp8Config())
    "hf_fp8_tensorwise",
    "hf_fp8_rowwise",
    "hf_fp8_delayed",
    "hf_fp8_full_bf16",
    "torchao_tensorwise_compile",
    "torchao_rowwise_compile",
    "liger",
]
LR = 1e-4  # --lr
SEED = 0  # the seed of the variant being built (--seeds)
# the baseline of a run's ratios: stock BF16, else stock BF16 with hf_fp8's AdamW (loss runs: the same optimizer)
STOCK = ("stock_bf16", "stock_bf16_hfadamw")


def build(name: str, config: dict):
    """The model and optimizer of one variant. hf_fp8 variants are ``hf_fp8[_<recipe>][_<option>...]``
    (no recipe: ``Fp8Config()``'s default), each option a public knob:

    - ``all``: ``auto_filter=False`` (every decoder linear in FP8, as torchao converts them);
      ``mlponly`` / ``attnonly``: ``include`` the MLPs / the attention blocks only; ``nofp8``:
      ``exclude=("*",)`` (FP32 RoPE and loss and the fused ops, no FP8 layer);
    - ``fp8attn``: ``fp8_attention=True``; ``savedwt``: ``save_weight_transpose=True``;
      ``fastacc``: ``use_fast_accum=True``; ``recomputeall``: ``keep_activations=0`` (with
      ``--checkpointing``, every layer recomputed, as transformers does);
    - ``graph``: ``cuda_graph=True`` and each step replayed by :class:`hf_fp8.CudaGraphStep`;
      ``compile``: each decoder layer compiled (as the other ``_compile`` variants);
    - the optimizer: what ``hf_fp8.Trainer`` builds for BF16 parameters
      (``hf_fp8.optim.AdamW(state_dtype=torch.bfloat16)``, stochastic rounding), ``nearest``:
      its round-to-nearest mode, ``defer``: ``defer_step=True`` (``--fp8_defer_step``),
      ``torchadamw``: torch's fused AdamW. Any non-hf_fp8 variant + ``_hfadamw`` gets hf_fp8's.
    """
    import transformers

    import hf_fp8

    config = dict(config)
    config_cls, model_cls, liger_fn = (getattr(transformers, n, n) for n in FAMILIES[config.pop("model_type", "llama")])
    config.setdefault("rope_theta", 500000.0)
    cfg = config_cls(**config, max_position_embeddings=8192, attn_implementation="sdpa")
    torch.manual_seed(SEED)
    with torch.device("cuda"), hf_fp8.set_default_dtype(torch.bfloat16):
        model = model_cls(cfg)
    note = ""
    if name == "liger":
        import liger_kernel.transformers

        getattr(liger_kernel.transformers, liger_fn)(model=model)
    elif name.startswith("torchao_"):
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        recipe = name.split("_")[1]
        convert_to_float8_training(
            model.model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=lambda m, fqn: True
        )
    elif name == "hf_fp8" or name.startswith("hf_fp8_"):
        rest = name.removeprefix("hf_fp8").removeprefix("_")
        recipes = ("full_bf16", "tensorwise", "rowwise", "delayed", "blockwise")
        recipe = next((r for r in recipes if rest == r or rest.startswith(r + "_")), None)
        flags = set(rest.removeprefix(recipe or "").split("_")) - {""}
        unknown = flags - {"all", "mlponly", "attnonly", "nofp8", "fp8attn", "savedwt", "fastacc", "graph",
                           "compile", "defer", "nearest", "torchadamw", "recomputeall"}  # fmt: skip
        if unknown:
            raise ValueError(f"{name}: unknown options {sorted(unknown)} (see build()'s docstring)")
        only = {"mlponly": ("*.mlp.*",), "attnonly": ("*.self_attn.*",)}
        include = next((only[f] for f in flags if f in only), ())
        kw = dict(recipe=None) if recipe == "full_bf16" else (dict(recipe=recipe) if recipe else {})
        fp8_cfg = hf_fp8.Fp8Config(
            **kw,
            fp8_attention="fp8attn" in flags,
            auto_filter="all" not in flags and not include,
            include=include,
            exclude=("*",) if "nofp8" in flags else (),
            use_fast_accum="fastacc" in flags,
            save_weight_transpose="savedwt" in flags,
            cuda_graph="graph" in flags,  # the auto filter's thresholds for graph-replayed steps
            keep_activations=0 if "recomputeall" in flags else "auto",
        )
        report = hf_fp8.convert(model, fp8_cfg)
        note = f"{len(report.converted)} FP8 layers ({fp8_cfg.short_str() if fp8_cfg.recipe else 'full-BF16'})"
    if name.endswith("_compile") or "_compile_" in name:
        for layer in model.model.layers:
            layer.compile()
    hf_variant = name == "hf_fp8" or name.startswith("hf_fp8_")
    graphed = "_graph" in name or name.endswith("_compile") or "_compile_" in name
    defer = hf_variant and not graphed and "_defer" in name
    if name.startswith("hf_fp8_full_bf16"):
        opt = hf_fp8.optim.AdamW(model.parameters(), lr=LR, full_bf16=True, seed=0, defer_step=defer)
    elif name.endswith("_hfadamw") or (hf_variant and "_torchadamw" not in name):
        opt = hf_fp8.optim.AdamW(
            model.parameters(),
            lr=LR,
            state_dtype=torch.bfloat16,
            stochastic_rounding="_nearest" not in name,
            defer_step=defer,
        )
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    if getattr(opt, "defer_step", False):
        opt.attach(model)
        note += "; update deferred to the next forward" if note else "update deferred to the next forward"
    return model, opt, note


_BATCHES: dict[tuple, list[torch.Tensor]] = {}


def bigram_batches(batch: int, seq: int, vocab: int, n: int) -> list[torch.Tensor]:
    """The same n batches for every variant of a seed (built once on the CPU, cached on the GPU)."""
    key = (batch, seq, vocab, n, SEED)
    if key not in _BATCHES:
        g = torch.Generator().manual_seed(SEED)
        successor = torch.randperm(vocab, generator=g)
        ids = torch.empty(n * batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (n * batch,), generator=g)
        noise = torch.randint(0, vocab, (n * batch, seq), generator=g)
        follow = torch.rand(n * batch, seq, generator=g) < 0.9
        for t in range(1, seq):  # sequential by nature
            ids[:, t] = torch.where(follow[:, t], successor[ids[:, t - 1]], noise[:, t])
        _BATCHES[key] = list(ids.cuda().split(batch))
    return _BATCHES[key]


def padded(batches: list[torch.Tensor], pad_frac: float) -> list[dict]:
    """SFT-style padded batches: row b of each batch keeps its first ``seq * (1 - f_b)`` tokens and
    is right-padded (pad id 0, attention mask 0, label -100) to the batch's length, with f_b spread
    evenly over the rows so that the batch's mean padding fraction is ``pad_frac``."""
    out = []
    for ids in batches:
        B, S = ids.shape
        fracs = [pad_frac * 2 * (b + 0.5) / B for b in range(B)]
        if max(fracs) >= 1:
            raise ValueError(f"--pad-frac {pad_frac}: row padding {max(fracs):.2f} leaves no tokens (B={B})")
        lengths = torch.tensor([round(S * (1 - f)) for f in fracs], device=ids.device)
        mask = (torch.arange(S, device=ids.device)[None, :] < lengths[:, None]).long()
        out.append(dict(input_ids=ids * mask, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)))
    return out


def run_variant(
    name: str,
    config: dict,
    batch: int,
    seq: int,
    warmup: int,
    steps: int,
    checkpointing: bool = False,
    pad_frac: float = 0.0,
) -> dict:
    model, opt, note = build(name, config)
    if checkpointing:  # HF's activation checkpointing (every decoder layer recomputed in the backward)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5.25
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        note += "; activation checkpointing" if note else "activation checkpointing"
    from benchmarks.common import time_training_steps

    forward_backward = None
    if "_graph" in name:
        from hf_fp8.cuda_graph import CudaGraphStep

        forward_backward = CudaGraphStep(model).forward_ids
        note += "; CUDA graph step"
    t_start = time.perf_counter()
    batches = bigram_batches(batch, seq, config["vocab_size"], warmup + steps)
    if pad_frac:
        batches = padded(batches, pad_frac)
        note += f"; {pad_frac:.0%} padding"
    hf_fp8_attention = getattr(model.config, "_attn_implementation", None) == "hf_fp8"
    if hf_fp8_attention:
        import hf_fp8

        hf_fp8.reset_fp8_coverage(model)
    timed = time_training_steps(model, opt, batches, warmup, forward_backward)
    if hf_fp8_attention:  # what attention ran: the FP8 kernel, or a fallback and why
        from hf_fp8.integrations.attention import _backward_path

        seen = set().union(*(s.keys() for s in hf_fp8.fp8_coverage(model).attention.values()))
        note += f"; attention: {', '.join(sorted(seen))}; backward: {_backward_path.get('last')}"
    if checkpointing and name.startswith("hf_fp8"):  # how many layers kept their activations (keep_activations)
        from hf_fp8.recompute import recompute_plans

        for plan in recompute_plans(model):
            note += f"; kept activations: {plan.last_kept}/{plan.last_checkpointed} layers ({plan.last_reason})"
    row = dict(
        variant=name,
        note=note,
        step_ms=timed["step_ms"],
        tokens_per_s=timed["tokens_per_s"],
        # graph variants: allocated memory misses the graph's pool (replays allocate nothing), so
        # their peak is what the allocator reserved (params, optimizer states and the pool)
        peak_mem_gb=timed["peak_reserved_gb" if forward_backward else "peak_mem_gb"],
        peak_allocated_gb=timed["peak_mem_gb"],
        peak_reserved_gb=timed["peak_reserved_gb"],
        loss=timed["losses"][-1],
        losses=timed["losses"],
        wall_s=time.perf_counter() - t_start,
    )
    # the graph step holds the model (and its pool): drop it too, or the next variant measures
    # this model's weights in its peak (seen: +5.7 GB)
    del model, opt, forward_backward
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["8b"], choices=sorted(CONFIGS))
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=520)
    ap.add_argument("--checkpointing", action="store_true", help="HF activation checkpointing in every variant")
    ap.add_argument(
        "--pad-frac",
        type=float,
        default=0.0,
        help="SFT-style right-padded batches with this mean fraction of padding (attention mask, labels -100)",
    )
    ap.add_argument("--lr", type=float, default=LR, help="AdamW learning rate of every variant")
    ap.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[SEED],
        help="each seed sets the model's initialization and the bigram stream (chain and batches) of every "
        "variant, and each variant runs once per seed (loss runs: how far runs scatter); ratios compare rows "
        "of one seed",
    )
    ap.add_argument(
        "--loss-window",
        type=int,
        default=0,
        help="also report each variant's mean loss over its last N steps, against stock BF16's (convergence runs: "
        "e.g. --configs 1b --steps 300 --loss-window 50)",
    )
    ap.add_argument("--out", default="llama_h100.json", help="results file name (in benchmarks/results/)")
    ap.add_argument("--plot", default=None, help="write a PNG bar chart from this JSON instead of running")
    ap.add_argument(
        "--isolate",
        action="store_true",
        help="run each variant in its own process: Liger patches HF's classes for the whole process and "
        "compiled variants leave dynamo state, so a shared process changes what later variants measure",
    )
    args = ap.parse_args()
    globals()["LR"] = args.lr
    if args.plot:
        print(f"wrote {plot(Path(args.plot))}")
        return
    from benchmarks.common import environment, warm_up_gpu, write_json

    warm_up_gpu()
    t0 = time.perf_counter()
    rows = []
    for cfg_name, seed, name in ((c, s, n) for c in args.configs for s in args.seeds for n in args.variants):
        globals()["SEED"] = seed
        if time.perf_counter() - t0 > args.budget_s:
            rows.append(dict(config=cfg_name, seed=seed, variant=name, skipped="time budget spent"))
            print(f"{cfg_name} {name}: skipped (time budget)", flush=True)
            continue
        try:
            if args.isolate:
                row = _run_isolated(name, cfg_name, seed, args)
            else:
                row = run_variant(
                    name, CONFIGS[cfg_name], args.batch, args.seq, args.warmup, args.steps, args.checkpointing,
                    args.pad_frac,
                )  # fmt: skip
        except Exception as e:  # noqa: BLE001  a failed variant is a result too
            import traceback

            traceback.print_exc(limit=3)
            row = dict(variant=name, error=f"{type(e).__name__}: {str(e)[:300]}")
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
        row["config"], row["seed"] = cfg_name, seed
        rows.append(row)
        same_run = [r for r in rows if (r["config"], r["seed"]) == (cfg_name, seed) and "step_ms" in r]
        base = next((r for v in STOCK for r in same_run if r["variant"] == v), None)
        if args.loss_window and "losses" in row:
            tail = row["losses"][-args.loss_window :]
            row["mean_loss_last"] = sum(tail) / len(tail)
        if base and "step_ms" in row:
            row["speedup_vs_stock"] = base["step_ms"] / row["step_ms"]
            row["mem_vs_stock"] = row["peak_mem_gb"] / base["peak_mem_gb"]
            row["loss_vs_stock"] = row["loss"] / base["loss"]
            if "mean_loss_last" in row and "mean_loss_last" in base:
                row["mean_loss_last_vs_stock"] = row["mean_loss_last"] / base["mean_loss_last"]
        print(f"{cfg_name} {json.dumps({k: v for k, v in row.items() if k != 'losses'})}", flush=True)
        payload = {"env": environment(), "batch": args.batch, "seq": args.seq, "warmup": args.warmup,
                   "steps": args.steps, "checkpointing": args.checkpointing, "pad_frac": args.pad_frac, "lr": args.lr,
                   "seeds": args.seeds, "loss_window": args.loss_window,
                   "configs": {k: CONFIGS[k] for k in args.configs}, "rows": rows}  # fmt: skip
        write_json(args.out, payload)  # after every variant: a cut-off run keeps what it measured


def _run_isolated(name: str, cfg_name: str, seed: int, args) -> dict:
    """One variant in a fresh ``python -m benchmarks.bench_llama`` process; its row, or the error
    (a crash shows as its exit status, e.g. -11 for a segfault)."""
    import os
    import subprocess

    from benchmarks.common import RESULTS

    tmp = f".isolated_{cfg_name}_{name}.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_llama", "--configs", cfg_name, "--variants", name, "--out", tmp]
    cmd += [
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
    ]
    if args.checkpointing:
        cmd.append("--checkpointing")
    cmd += ["--lr", str(args.lr), "--pad-frac", str(args.pad_frac), "--seeds", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = RESULTS / tmp
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    for d in (RESULTS, Path(os.environ.get("OUT", RESULTS))):  # write_json also copies results to $OUT
        (d / tmp).unlink(missing_ok=True)
    if proc.returncode != 0 or not rows:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(variant=name, error=f"exit status {proc.returncode}: {' | '.join(tail)[:300]}")
    drop = (
        "config",
        "seed",
        "speedup_vs_stock",
        "mem_vs_stock",
        "loss_vs_stock",
        "mean_loss_last",
        "mean_loss_last_vs_stock",
    )
    return {k: v for k, v in rows[0].items() if k not in drop}


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    configs = sorted({r["config"] for r in data["rows"] if "speedup_vs_stock" in r})
    fig, axes = plt.subplots(1, len(configs), figsize=(7 * len(configs), 4.5), squeeze=False)
    for ax, cfg in zip(axes[0], configs):
        rows = [r for r in data["rows"] if r["config"] == cfg and "speedup_vs_stock" in r]
        names = [r["variant"] for r in rows]
        vals = [r["speedup_vs_stock"] for r in rows]
        colors = ["tab:blue" if n.startswith("hf_fp8") else "tab:gray" for n in names]
        ax.barh(names, vals, color=colors)
        ax.axvline(1.0, color="k", lw=0.8)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.2f}x", va="center")
        ax.set_xlabel("tokens/s vs stock BF16")
        ax.set_title(f"{cfg}: B={data['batch']}, S={data['seq']}, {data['env'].get('gpu', '')}")
        ax.invert_yaxis()
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    sys.exit(main())
