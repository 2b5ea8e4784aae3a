"""LoRA fine-tuning on the H100: stock BF16 LoRA vs LoRA on hf_fp8 FP8 layers, with and without
FP8-only base weights, on an HF Llama with Llama-3-8B layer shapes.

    python -m benchmarks.bench_lora [--layers 8] [--batch 2] [--seq 4096] [--steps 12] [--variants ...]

LoRA r=16 on q/k/v/o/gate/up/down, adapters FP32 (PEFT's default), AdamW on the adapters,
BF16 model. ``published_fp8_*``: the targeted layers hold a block-FP8 checkpoint's weights (E4M3
codes in 128x128 blocks, as :func:`hf_fp8.from_pretrained` loads them: ``FrozenFp8Linear``),
set up as :func:`hf_fp8.from_pretrained` does (``hf_fp8.convert`` on the rest: FP32 RoPE and
chunked loss, fused norms), computing on the weights dequantized on the fly (``_dequant``:
``from_pretrained(path)``) or with blockwise FP8 GEMMs on the codes (``_blockwise``:
``from_pretrained(path, "blockwise")``); stock BF16 LoRA
on the same (dequantized) weights is the baseline. Per variant: bytes of the frozen base weights (the LoRA-targeted linear layers, and
all frozen parameters including the BF16 embedding and lm_head), peak memory of a training
step, median step time over the timed steps after warm-up, tokens/s, last loss.
"""

from __future__ import annotations

import argparse
import gc

import torch

from benchmarks.common import environment, warm_up_gpu, write_json

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = (
    "stock_bf16_lora",
    "hf_fp8_lora_bf16_weights",
    "hf_fp8_lora_fp8_weights",
    "published_fp8_lora_dequant",
    "published_fp8_lora_blockwise",
)


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model


def _to_published_blocks(model) -> None:
    """The targeted linears as a 128x128-block FP8 checkpoint's frozen layers (codes and scales)."""
    from hf_fp8.frozen_fp8 import FrozenFp8Linear
    from hf_fp8.kernels.blockwise_reference import quantize_blocks

    for name, module in list(model.named_modules()):
        if name.rpartition(".")[2] in TARGETS:
            q = quantize_blocks(module.weight.detach(), torch.float8_e4m3fn)
            frozen = FrozenFp8Linear(q.data, q.scale_inv, (128, 128), compute_dtype=torch.bfloat16)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, frozen)
    torch.cuda.empty_cache()


def run_variant(name: str, layers: int, batch: int, seq: int, steps: int, warmup: int) -> dict:
    import peft

    import hf_fp8

    model = build(layers)
    model.requires_grad_(False)
    if name.startswith("published_fp8"):  # as hf_fp8.from_pretrained(path[, "blockwise"]) sets it up
        from hf_fp8.integrations.published import prepare_frozen_fp8_model

        _to_published_blocks(model)
        report = prepare_frozen_fp8_model(model, "blockwise" if name.endswith("_blockwise") else None)
        model.requires_grad_(False)  # PEFT trains the adapters only
        print(f"{name}: {report.notes[-2:]}", flush=True)
    elif name != "stock_bf16_lora":
        cfg = hf_fp8.Fp8Config(recipe="tensorwise", fp8_weights=(name == "hf_fp8_lora_fp8_weights"))
        report = hf_fp8.convert(model, cfg)
        print(f"{name}: {len(report.converted)} layers converted", flush=True)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    targeted = [m.get_base_layer() for m in pm.modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")]
    targeted_bytes = sum(m.weight.numel() * m.weight.element_size() for m in targeted)
    frozen_bytes = sum(p.numel() * p.element_size() for p in pm.parameters() if not p.requires_grad)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4, fused=True)
    from benchmarks.common import time_training_steps

    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 128256, (batch, seq), device="cuda", generator=g)
    timed = time_training_steps(pm, opt, [ids] * (warmup + steps), warmup)
    row = dict(
        variant=name,
        layers=layers,
        batch=batch,
        seq=seq,
        targeted_base_weight_gb=targeted_bytes / 1e9,
        frozen_param_gb=frozen_bytes / 1e9,
        peak_mem_gb=timed["peak_mem_gb"],
        step_ms=timed["step_ms"],
        tokens_per_s=timed["tokens_per_s"],
        loss=timed["losses"][-1],
    )
    print(row, flush=True)
    del pm, model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="the first is the baseline")
    ap.add_argument("--out", default="lora_h100.json")
    args = ap.parse_args()
    warm_up_gpu()
    rows = []
    for name in args.variants:
        try:
            rows.append(run_variant(name, args.layers, args.batch, args.seq, args.steps, args.warmup))
        except Exception as e:  # noqa: BLE001  a failed variant is a result too
            import traceback

            traceback.print_exc()
            rows.append(dict(variant=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
    base = rows[0]
    for r in rows:
        if "error" in r or "error" in base:
            continue
        for k in ("targeted_base_weight_gb", "frozen_param_gb", "peak_mem_gb"):
            r[k.replace("_gb", "_vs_stock")] = r[k] / base[k]
        r["speedup_vs_stock"] = base["step_ms"] / r["step_ms"]
        print(
            f"{r['variant']:28s} base weights {r['targeted_base_weight_gb']:.2f} GB "
            f"({r['targeted_base_weight_vs_stock']:.2f}x), all frozen {r['frozen_param_gb']:.2f} GB "
            f"({r['frozen_param_vs_stock']:.2f}x), peak {r['peak_mem_gb']:.1f} GB ({r['peak_mem_vs_stock']:.2f}x), "
            f"step {r['step_ms']:.1f} ms ({r['speedup_vs_stock']:.2f}x), loss {r['loss']:.4f}",
            flush=True,
        )
    print(f"wrote {write_json(args.out, {'env': environment(), 'rows': rows})}")


if __name__ == "__main__":
    main()
