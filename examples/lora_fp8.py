"""LoRA on an FP8 base model: the frozen base layers run in FP8, the adapters train in FP32.

    python examples/lora_fp8.py                         # tiny Llama + public-domain text, CPU is fine
    python examples/lora_fp8.py --model_name_or_path meta-llama/Llama-3.1-8B --steps 100
    python examples/lora_fp8.py --no_fp8_weights --recipe rowwise   # keep BF16 base weights

Converts the model, storing the frozen base weights in FP8 only (``Fp8Config(fp8_weights=True)``:
half the memory of BF16 base weights; frozen layers skip the weight-gradient GEMM entirely), wraps it with
``peft.get_peft_model``, trains the adapters, saves them with PEFT's own ``save_pretrained``,
then merges them and saves a stock checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import hf_fp8

sys.path.insert(0, str(Path(__file__).parent))
from _shared import DEFAULT_TEXT, TextBlocks, load  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name_or_path", default=None)
    ap.add_argument("--recipe", default=hf_fp8.Fp8Config().recipe.value, choices=["delayed", "tensorwise", "rowwise"])
    ap.add_argument(
        "--no_fp8_weights",
        action="store_true",
        help="keep the base weights in their own dtype (needed for --recipe rowwise)",
    )
    ap.add_argument("--text_file", default=str(DEFAULT_TEXT))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--output_dir", default="runs/lora_fp8")
    args = ap.parse_args(argv)
    from peft import LoraConfig, get_peft_model

    text = Path(args.text_file).read_text()
    model, tokenizer = load(args.model_name_or_path, text)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    embedded = args.model_name_or_path is None
    # the embedded model is too small for FP8 to pay off: convert all its layers anyway, to show the path
    cfg = hf_fp8.Fp8Config(
        recipe=args.recipe, auto_filter=not embedded, exclude=("lm_head",), fp8_weights=not args.no_fp8_weights
    )
    model.requires_grad_(False)
    print(hf_fp8.convert(model, cfg))
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    peft_model.print_trainable_parameters()
    data = torch.utils.data.DataLoader(
        TextBlocks(text, tokenizer, args.seq_len),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr)
    step, t0 = 0, time.perf_counter()
    while step < args.steps:
        for batch in data:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = peft_model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step == 1 or step % 10 == 0 or step == args.steps:
                print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
            if step == args.steps:
                break
    out = Path(args.output_dir)
    peft_model.save_pretrained(out / "adapter")
    merged = peft_model.merge_and_unload()
    hf_fp8.revert(merged)
    merged.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
    print(
        f"saved the LoRA adapter to {(out / 'adapter').resolve()} and the merged model to {(out / 'merged').resolve()}"
    )
    return str(out)


if __name__ == "__main__":
    main()
