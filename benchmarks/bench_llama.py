"""End-to-end training throughput of an HF Llama on the H100: stock BF16, Liger, torch.compile,
torchao float8 and hf_fp8, side by side in one run.

    python -m benchmarks.bench_llama [--configs 8b 1b] [--budget-s 520]
    python -m benchmarks.bench_llama --plot benchmarks/results/llama_h100.json   # PNG bar chart

Models (random init, BF16 parameters, SDPA attention): Llama-3-8B layer shapes with 8 layers
("8b": hidden 4096, MLP 14336, 32/8 heads, vocab 128256), and Llama-3.2-1B ("1b": hidden 2048,
MLP 8192, 16 layers, 32/8 heads, tied embeddings). B=2, S=4096; every step a new batch drawn
from a fixed random bigram chain (90% of tokens follow it), the same batches for every variant:
learnable but not memorizable, so the losses compare training, not recall of one batch. Optimizer: torch fused AdamW (BF16 states, as stock BF16 training
does), except hf_fp8 full-BF16 which uses hf_fp8.optim.AdamW (FP32 states, stochastic
rounding), and the hf_fp8 FP8 variants, which use what hf_fp8.Trainer builds for BF16 parameters:
hf_fp8.optim.AdamW with BF16 states and nearest rounding (torch's arithmetic, one kernel per
tensor; since 2026-11-24 12:30). ..._torchadamw gives an hf_fp8 variant torch's fused AdamW,
..._hfadamw gives any other variant hf_fp8's. Per variant: tokens/s from the median step time after warm-up, peak memory,
and the loss of the last timed step (same data and steps for everyone), with ratios to stock
BF16. Variants that fail are recorded with their error; the run stops adding variants when
the time budget is spent and says which were skipped.
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
}  # fmt: skip

# Liger last: apply_liger_kernel_to_llama patches transformers' Llama classes for the whole
# process (RMSNorm, SwiGLU, RoPE, loss), so every model built after it would run Liger's kernels
# (measured: hf_fp8 delayed 1.13x -> 1.29x when built after the Liger variant).
VARIANTS = [
    "stock_bf16",
    "hf_fp8_tensorwise",
    "hf_fp8_delayed",
    "hf_fp8_delayed_savedwt",
    "hf_fp8_rowwise",
    "hf_fp8_delayed_fp8attn",
    "hf_fp8_delayed_fp8attn_all",
    "hf_fp8_full_bf16",
    "hf_fp8_delayed_compile",
    "bf16_compile",
    "torchao_tensorwise",
    "torchao_tensorwise_compile",
    "torchao_rowwise_compile",
    "liger",
]


def _fast_launch_default() -> bool:
    from hf_fp8.kernels import _launch

    return _launch._ENABLED


_FAST_LAUNCH_DEFAULT = None
_LOSS_DEFAULTS = None  # hf_fp8.loss.CHUNK_BYTES, GRAD_BLOCK_BYTES as the library sets them
_CAST_T_DEFAULTS = None  # the transposed cast's tile and mode (hf_fp8.kernels.quant.TUNING)


def build(name: str, config: dict):
    global _FAST_LAUNCH_DEFAULT, _LOSS_DEFAULTS, _CAST_T_DEFAULTS
    from hf_fp8.kernels import quant as hf_quant

    if _FAST_LAUNCH_DEFAULT is None:
        from hf_fp8 import loss as hf_loss

        _FAST_LAUNCH_DEFAULT = _fast_launch_default()
        _LOSS_DEFAULTS = (hf_loss.CHUNK_BYTES, hf_loss.GRAD_BLOCK_BYTES)
        _CAST_T_DEFAULTS = (hf_quant.TUNING["cast_t"], hf_quant.TUNING["cast_t_mode"])
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_fp8

    cfg = LlamaConfig(**config, max_position_embeddings=8192, rope_theta=500000.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"), hf_fp8.set_default_dtype(torch.bfloat16):
        model = LlamaForCausalLM(cfg)
    note = ""
    if name == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=model)
    elif name.startswith("torchao_"):
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        recipe = name.split("_")[1]
        convert_to_float8_training(
            model.model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=lambda m, fqn: True
        )
    elif name.startswith("hf_fp8_"):
        # hf_fp8_<recipe>[_fp8attn][_all][_recast|_savedwt][_unfusedmlp][_jitlaunch][_percast][_wholeloss][_keptact]
        # [_savedoproj][_mlponly|_attnonly|_nofp8][_fastacc][_graph][_compile]: _all converts every
        # decoder linear (no auto filter), as torchao does; _recast re-casts weight transposes in the backward, _savedwt keeps them
        # (save_weight_transpose=False); _unfusedmlp runs the MLP as three FP8 layers and a SwiGLU
        # kernel (hf_fp8.mlp_ops off); _jitlaunch launches Triton kernels through the JIT (hf_fp8.kernels._launch
        # off); _percast updates delayed scales per cast (hf_fp8.delayed off); _wholeloss holds the
        # loss's logits gradient for all tokens at once (one weight-gradient GEMM; 512-token chunks:
        # the loss before 2026-11-24), _chunk<N> / _block<N> set its chunk / gradient block in tokens; _keptact keeps down's transposed FP8 input from the forward
        # (hf_fp8.mlp_ops.RECOMPUTE_DOWN_INPUT_T off; the default before 2026-11-24); _savedoproj keeps
        # o_proj's FP8 transposed input (no re-cast from the attention output; before 2026-11-24);
        # _fastacc: Fp8Config(use_fast_accum=True) (the forward GEMMs accumulate as torchao's do);
        # _graph runs each step's forward and backward as one CUDA graph (hf_fp8.CudaGraphStep) and
        # converts with Fp8Config(cuda_graph=True) (since 2026-11-24 06:05; before, the eager filter);
        # _compile compiles each decoder layer, as the other _compile variants do; _hfcache: training
        # steps keep HF's default KV cache (integrations.loss.STORELESS_TRAINING_CACHE off; the
        # default before 2026-11-24 09:00); _unfusednorm: each RMSNorm writes its output and the FP8
        # layers cast it (hf_fp8.norm_ops off; the default before 2026-11-24 10:00)
        from hf_fp8 import embedding_ops as hf_embedding_ops
        from hf_fp8 import loss as hf_loss
        from hf_fp8 import mlp_ops
        from hf_fp8 import norm_ops as hf_norm_ops
        from hf_fp8.integrations import fused_ops as hf_fused_ops
        from hf_fp8.integrations import loss as hf_integ_loss
        from hf_fp8.integrations import rope as hf_rope
        from hf_fp8.kernels import _launch

        rest = name.removeprefix("hf_fp8_")
        recipe = "full_bf16" if rest.startswith("full_bf16") else rest.split("_")[0]
        flags = set(rest.removeprefix(recipe).split("_"))
        mlp_ops.ENABLED = "unfusedmlp" not in flags  # read at every forward; stays until the next hf_fp8 build
        mlp_ops.RECOMPUTE_DOWN_INPUT_T = "keptact" not in flags  # likewise
        hf_rope.RECAST_OPROJ_INPUT = "savedoproj" not in flags  # likewise
        hf_integ_loss.STORELESS_TRAINING_CACHE = "hfcache" not in flags  # likewise
        hf_norm_ops.ENABLED = "unfusednorm" not in flags  # likewise
        # _noresgrad: HF's residual adds of the gradients (hf_fp8.integrations.fused_ops.PASS_RESIDUAL
        # off; the default before 2026-11-24 16:30); _torchemb: torch's embedding backward
        # (hf_fp8.embedding_ops off; likewise)
        hf_fused_ops.PASS_RESIDUAL = "noresgrad" not in flags  # likewise
        hf_embedding_ops.ENABLED = "torchemb" not in flags  # likewise
        hf_loss.CHUNK_BYTES, hf_loss.GRAD_BLOCK_BYTES = (1 << 28, 1 << 62) if "wholeloss" in flags else _LOSS_DEFAULTS
        for f in flags:  # _chunk<tokens>, _block<tokens>: tokens per logits GEMM and per FP32 logits buffer
            if f.startswith("chunk"):
                hf_loss.CHUNK_BYTES = int(f[5:]) * 4 * config["vocab_size"]
            elif f.startswith("block"):
                hf_loss.GRAD_BLOCK_BYTES = int(f[5:]) * 4 * config["vocab_size"]
        _launch._ENABLED = _FAST_LAUNCH_DEFAULT and "jitlaunch" not in flags  # likewise
        # _oldcast: the transposed casts as before 2026-11-24 (128x64 tiles, FP32 through shared memory)
        old_cast = ((128, 64, 4), (0,))
        hf_quant.TUNING["cast_t"], hf_quant.TUNING["cast_t_mode"] = old_cast if "oldcast" in flags else _CAST_T_DEFAULTS
        # weight transposes: the library's default unless a flag says otherwise (the default was True
        # before 2026-11-24: plain variant names in older results files kept the transposes)
        wt = {"save_weight_transpose": True} if "savedwt" in flags else {}
        wt = {"save_weight_transpose": False} if "recast" in flags else wt
        # _mlponly / _attnonly: every linear of the MLPs / of the attention blocks in FP8, the rest BF16;
        # _nofp8: no FP8 layer (fused ops, FP32 RoPE and loss only)
        only = {"mlponly": ("*.mlp.*",), "attnonly": ("*.self_attn.*",)}
        include = next((only[f] for f in flags if f in only), ())
        fp8_cfg = hf_fp8.Fp8Config(
            recipe=None if recipe == "full_bf16" else recipe,
            fp8_attention="fp8attn" in flags,
            auto_filter="all" not in flags and not include,
            include=include,
            exclude=("*",) if "nofp8" in flags else ("lm_head",),
            use_fast_accum="fastacc" in flags,
            cuda_graph="graph" in flags,  # the auto filter's thresholds for graph-replayed steps
            **wt,
        )
        report = hf_fp8.convert(model, fp8_cfg)
        note = f"{len(report.converted)} FP8 layers"
        if "percast" in flags:  # delayed: each cast updates its own scale (no per-forward update launch)
            from hf_fp8.delayed import remove_delayed_update_hook

            remove_delayed_update_hook(model)
    if name.endswith("_compile") or "_compile_" in name:
        for layer in model.model.layers:
            layer.compile()
    # The update at the start of the next forward (AdamW(defer_step=True) attached to the model), as
    # hf_fp8.Trainer builds it with --fp8_defer_step true (opt-in): variants with _defer, unless _graph
    # or _compile (the Trainer's exceptions). Plain hf_fp8 variants update in step(), the Trainer's default.
    hf_variant = name.startswith("hf_fp8_")
    graphed = "_graph" in name or name.endswith("_compile") or "_compile_" in name
    defer = not graphed and "_defer" in name
    if name == "hf_fp8_full_bf16":
        opt = hf_fp8.optim.AdamW(model.parameters(), lr=1e-4, full_bf16=True, seed=0, defer_step=defer)
    elif name.endswith("_hfadamw") or (hf_variant and "_torchadamw" not in name):
        # hf_fp8 variants (what hf_fp8.Trainer's --fp8 builds for BF16 parameters, --fp8_adamw) and any
        # variant + _hfadamw: hf_fp8.optim.AdamW with torch's arithmetic and states (BF16 moments,
        # nearest rounding), one kernel per tensor instead of torch's multi-tensor launches;
        # hf_fp8 variants + _torchadamw: torch's fused AdamW (every hf_fp8 variant before 2026-11-24 12:30)
        # stochastic rounding of the weights and BF16 moments, as hf_fp8.Trainer builds it (since
        # 2026-12-06); _nearest: round to nearest (torch's arithmetic, the Trainer's default before)
        opt = hf_fp8.optim.AdamW(
            model.parameters(),
            lr=1e-4,
            state_dtype=torch.bfloat16,
            stochastic_rounding="_nearest" not in name,
            defer_step=defer,
        )
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if getattr(opt, "defer_step", False):
        opt.attach(model)
        note += "; update deferred to the next forward" if note else "update deferred to the next forward"
    return model, opt, note


_BATCHES: dict[tuple, list[torch.Tensor]] = {}


def bigram_batches(batch: int, seq: int, vocab: int, n: int) -> list[torch.Tensor]:
    """The same n batches for every variant (built once on the CPU, cached on the GPU)."""
    key = (batch, seq, vocab, n)
    if key not in _BATCHES:
        g = torch.Generator().manual_seed(0)
        successor = torch.randperm(vocab, generator=g)
        ids = torch.empty(n * batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (n * batch,), generator=g)
        noise = torch.randint(0, vocab, (n * batch, seq), generator=g)
        follow = torch.rand(n * batch, seq, generator=g) < 0.9
        for t in range(1, seq):  # sequential by nature
            ids[:, t] = torch.where(follow[:, t], successor[ids[:, t - 1]], noise[:, t])
        _BATCHES[key] = list(ids.cuda().split(batch))
    return _BATCHES[key]


def run_variant(
    name: str, config: dict, batch: int, seq: int, warmup: int, steps: int, checkpointing: bool = False
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
    # _hostwait<ms> (any variant): the host sleeps that long at each step's start (a probe of how
    # much of a host delay there the step shows, under the GPU's power cap)
    wait = next((float(f[8:]) for f in name.split("_") if f.startswith("hostwait")), 0.0)
    if wait:
        note += f"; host waits {wait:g} ms per step"
    timed = time_training_steps(model, opt, batches, warmup, forward_backward, host_wait_s=wait / 1e3)
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
    ap.add_argument("--out", default="llama_h100.json", help="results file name (in benchmarks/results/)")
    ap.add_argument("--plot", default=None, help="write a PNG bar chart from this JSON instead of running")
    ap.add_argument(
        "--isolate",
        action="store_true",
        help="run each variant in its own process: Liger patches HF's classes for the whole process and "
        "compiled variants leave dynamo state, so a shared process changes what later variants measure",
    )
    args = ap.parse_args()
    if args.plot:
        print(f"wrote {plot(Path(args.plot))}")
        return
    from benchmarks.common import environment, warm_up_gpu, write_json

    warm_up_gpu()
    t0 = time.perf_counter()
    rows = []
    for cfg_name in args.configs:
        for name in args.variants:
            if time.perf_counter() - t0 > args.budget_s:
                rows.append(dict(config=cfg_name, variant=name, skipped="time budget spent"))
                print(f"{cfg_name} {name}: skipped (time budget)", flush=True)
                continue
            try:
                if args.isolate:
                    row = _run_isolated(name, cfg_name, args)
                else:
                    row = run_variant(
                        name, CONFIGS[cfg_name], args.batch, args.seq, args.warmup, args.steps, args.checkpointing
                    )
            except Exception as e:  # noqa: BLE001  a failed variant is a result too
                import traceback

                traceback.print_exc(limit=3)
                row = dict(variant=name, error=f"{type(e).__name__}: {str(e)[:300]}")
                gc.collect()
                torch.cuda.empty_cache()
                torch._dynamo.reset()
            row["config"] = cfg_name
            rows.append(row)
            base = next(
                (r for r in rows if r["config"] == cfg_name and r["variant"] == "stock_bf16" and "step_ms" in r), None
            )
            if base and "step_ms" in row:
                row["speedup_vs_stock"] = base["step_ms"] / row["step_ms"]
                row["mem_vs_stock"] = row["peak_mem_gb"] / base["peak_mem_gb"]
                row["loss_vs_stock"] = row["loss"] / base["loss"]
            print(f"{cfg_name} {json.dumps({k: v for k, v in row.items() if k != 'losses'})}", flush=True)
            payload = {"env": environment(), "batch": args.batch, "seq": args.seq, "warmup": args.warmup,
                       "steps": args.steps, "checkpointing": args.checkpointing,
                       "configs": {k: CONFIGS[k] for k in args.configs}, "rows": rows}  # fmt: skip
            write_json(args.out, payload)  # after every variant: a cut-off run keeps what it measured


def _run_isolated(name: str, cfg_name: str, args) -> dict:
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
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = RESULTS / tmp
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    for d in (RESULTS, Path(os.environ.get("OUT", RESULTS))):  # write_json also copies results to $OUT
        (d / tmp).unlink(missing_ok=True)
    if proc.returncode != 0 or not rows:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(variant=name, error=f"exit status {proc.returncode}: {' | '.join(tail)[:300]}")
    return {
        k: v for k, v in rows[0].items() if k not in ("config", "speedup_vs_stock", "mem_vs_stock", "loss_vs_stock")
    }


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
