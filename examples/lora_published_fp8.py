"""LoRA on a published FP8 checkpoint, its FP8 weights kept as stored.

    python examples/lora_published_fp8.py                               # makes a tiny FP8 checkpoint first
    python examples/lora_published_fp8.py --checkpoint Qwen/Qwen3-0.6B-FP8 --steps 50

``hf_fp8.from_pretrained`` reads transformers' fine-grained FP8 format (``weight_scale_inv`` per
block, any block shape, sharded) and compressed-tensors FP8 (per tensor, channel or block): the
quantized linears keep the checkpoint's E4M3 codes and scales (one byte per weight, frozen),
the rest loads in BF16. Under ``--recipe blockwise`` (the default) the layers stored in 128x128
blocks multiply their codes directly (blockwise FP8 GEMMs, activations in 1x128 E4M3 tiles, as
the checkpoint is served); ``--recipe delayed`` computes on them dequantized on the fly. PEFT's
LoRA trains adapters on top; ``merge_and_unload`` gives a
high-precision model (dequantized base + delta, rounded once), saved as a stock checkpoint and
in FP8 with the checkpoint's own block layout (``hf_fp8.save_fp8``: untouched layers bit for bit).
Without ``--checkpoint`` a tiny Llama is saved in the fine-grained format (``hf_fp8.save_fp8``,
128x128 blocks) and fine-tuned from there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import hf_fp8

sys.path.insert(0, str(Path(__file__).parent))
from _shared import DEFAULT_TEXT, TextBlocks, build_tokenizer, tiny_llama  # noqa: E402


def make_tiny_fp8_checkpoint(directory: Path, text: str):
    """A tiny Llama (every dimension a multiple of 128) saved in transformers' fine-grained FP8 format."""
    tokenizer = build_tokenizer(text)
    model = tiny_llama(512, torch.bfloat16)
    hf_fp8.save_fp8(model, directory, tokenizer=tokenizer)
    return tokenizer


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="A published FP8 checkpoint (folder or Hub id)")
    ap.add_argument("--output_dir", default="runs/lora_published_fp8")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--recipe", default="blockwise", help="hf_fp8 recipe (blockwise: FP8 GEMMs on 128x128-block codes)")
    args = ap.parse_args(argv)
    import peft

    out = Path(args.output_dir)
    text = DEFAULT_TEXT.read_text()
    if args.checkpoint is None:
        args.checkpoint = str(out / "tiny-fp8")
        tokenizer = make_tiny_fp8_checkpoint(Path(args.checkpoint), text)
        print(f"saved a tiny Llama in transformers' fine-grained FP8 format to {args.checkpoint}")
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, report = hf_fp8.from_pretrained(args.checkpoint, args.recipe, device=device)
    print(report)
    frozen = [m for m in model.modules() if isinstance(m, hf_fp8.FrozenFp8Linear)]
    gb = sum(m.weight.numel() for m in frozen) / 1e9
    print(f"{len(frozen)} layers keep their FP8 codes: {gb:.3f} GB of base weights (BF16 would take {2 * gb:.3f})")
    cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0)
    pm = peft.get_peft_model(model, cfg)
    data = TextBlocks(text, tokenizer, args.seq_len)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    for step in range(args.steps):
        ids = torch.stack([data[(step * 4 + i) % len(data)]["input_ids"] for i in range(4)]).to(device)
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    merged = pm.merge_and_unload()
    merged.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
    print(f"saved the merged model (a stock checkpoint) to {(out / 'merged').resolve()}")
    hf_fp8.save_fp8(merged, out / "merged-fp8", tokenizer=tokenizer)
    print(f"saved it in FP8, in the checkpoint's own block layout, to {(out / 'merged-fp8').resolve()}")
    return {"losses": losses, "merged": str(out / "merged"), "merged_fp8": str(out / "merged-fp8")}


if __name__ == "__main__":
    main()
