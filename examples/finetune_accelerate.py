"""A plain accelerate training loop in FP8: the only hf_fp8 line is ``hf_fp8.Accelerator()``.

    accelerate launch --config_file examples/accelerate/fp8.yaml examples/finetune_accelerate.py
    HF_FP8_RECIPE=rowwise accelerate launch --config_file examples/accelerate/fp8.yaml examples/finetune_accelerate.py
    accelerate launch --config_file examples/accelerate/cpu.yaml examples/finetune_accelerate.py --steps 5
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/finetune_accelerate.py    # 2 processes
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/finetune_accelerate.py  # FSDP2

The recipe comes from ``HF_FP8_RECIPE`` (default here: hf_fp8's default, delayed) or from
accelerate's own FP8 launch settings; ``HF_FP8_AUTO_FILTER=0`` converts layers the size filter
would keep (this script sets it for its tiny default model, whose layers are all below the
sizes where FP8 pays off); ``--model_name_or_path`` trains a real checkpoint instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

import hf_fp8

sys.path.insert(0, str(Path(__file__).parent))
from _shared import DEFAULT_TEXT, TextBlocks, load  # noqa: E402


def main(argv: list[str] | None = None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name_or_path", default=None)
    ap.add_argument("--text_file", default=str(DEFAULT_TEXT))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)
    embedded = args.model_name_or_path is None
    if embedded:
        # the tiny default model is too small for the size filter: convert every layer but lm_head
        os.environ.setdefault("HF_FP8_AUTO_FILTER", "0")
    if "ACCELERATE_MIXED_PRECISION" not in os.environ or os.environ["ACCELERATE_MIXED_PRECISION"] != "fp8":
        os.environ.setdefault("HF_FP8_RECIPE", hf_fp8.Fp8Config().recipe.value)
    text = Path(args.text_file).read_text()
    model, tokenizer = load(args.model_name_or_path, text)
    data = torch.utils.data.DataLoader(
        TextBlocks(text, tokenizer, args.seq_len),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    accelerator = hf_fp8.Accelerator()  # the one hf_fp8 line
    model, optimizer, data = accelerator.prepare(model, optimizer, data)

    losses: list[float] = []
    model.train()
    while len(losses) < args.steps:
        for batch in data:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if accelerator.is_main_process and (len(losses) % 10 == 0 or len(losses) == 1):
                print(f"step {len(losses):4d}  loss {losses[-1]:.4f}", flush=True)
            if len(losses) == args.steps:
                break
    if accelerator.is_main_process:
        print(
            f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}; FP8 layers: "
            f"{sum(isinstance(m, hf_fp8.Fp8Linear) for m in accelerator.unwrap_model(model).modules())}; "
            f"processes: {accelerator.num_processes} ({accelerator.distributed_type.value}, "
            f"model wrapped as {type(model).__name__})"
        )
    return losses


if __name__ == "__main__":
    main()
