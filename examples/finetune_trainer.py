"""Fine-tune a Llama with the HF Trainer and one flag: ``--fp8 delayed|tensorwise|rowwise|blockwise`` (or ``--full_bf16``).

    python examples/finetune_trainer.py                       # tiny Llama + public-domain text, CPU is fine
    python examples/finetune_trainer.py --fp8 rowwise --max_steps 60
    python examples/finetune_trainer.py --fp8 none            # the same run in BF16, for comparison
    python examples/finetune_trainer.py --model_name_or_path meta-llama/Llama-3.2-1B \\
        --bf16 --per_device_train_batch_size 4 --seq_len 2048 --max_steps 200 --output_dir runs/llama1b-fp8

Every ``transformers.TrainingArguments`` option works; hf_fp8 adds ``--fp8``, ``--full_bf16``,
``--fp8_auto_filter``, ``--fp8_include`` and ``--fp8_exclude``. Without ``--fp8`` or ``--full_bf16``
this script uses hf_fp8's default recipe (delayed), with a checkpoint as with the tiny model. The run ends by saving a stock HF
checkpoint (loadable without hf_fp8) and printing where.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from transformers import HfArgumentParser

import hf_fp8

sys.path.insert(0, str(Path(__file__).parent))
from _shared import DEFAULT_TEXT, TextBlocks, load, with_recipe_defaults  # noqa: E402


@dataclasses.dataclass
class ScriptArguments:
    model_name_or_path: str | None = dataclasses.field(
        default=None, metadata={"help": "A checkpoint to fine-tune; default: a tiny Llama built in code."}
    )
    text_file: str = dataclasses.field(default=str(DEFAULT_TEXT), metadata={"help": "Plain-text training data."})
    seq_len: int = dataclasses.field(default=64, metadata={"help": "Tokens per training example."})


# Defaults for the embedded tiny model on a CPU; anything on the command line overrides them.
TINY_DEFAULTS = [
    "--output_dir",
    "runs/finetune_trainer",
    "--max_steps",
    "40",
    "--per_device_train_batch_size",
    "8",
    "--learning_rate",
    "3e-3",
    "--logging_steps",
    "5",
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--fp8_auto_filter",
    "false",
    "--seed",
    "0",
]
ANY_DEFAULTS = ["--output_dir", "runs/finetune_trainer", "--report_to", "none"]


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    embedded = "--model_name_or_path" not in argv
    defaults = with_recipe_defaults(argv, TINY_DEFAULTS if embedded else ANY_DEFAULTS)
    parser = HfArgumentParser((ScriptArguments, hf_fp8.TrainingArguments))
    script, args = parser.parse_args_into_dataclasses(args=defaults + argv)
    text = Path(script.text_file).read_text()
    dtype = torch.bfloat16 if args.full_bf16 else None
    model, tokenizer = load(script.model_name_or_path, text, dtype)
    if torch.cuda.is_available() and not args.use_cpu:
        model.set_attn_implementation("sdpa")  # the tiny model's default, eager, is for CPUs (and cannot be graphed)
    trainer = hf_fp8.Trainer(model=model, args=args, train_dataset=TextBlocks(text, tokenizer, script.seq_len))
    if trainer.fp8_report is not None:
        print(trainer.fp8_report, flush=True)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if len(losses) >= 2:
        print(f"loss: first logged {losses[0]:.4f}, last logged {losses[-1]:.4f}")
    print(f"mean training loss over {result.global_step} steps: {result.training_loss:.4f}")
    trainer.save_model(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"saved a stock Hugging Face checkpoint to {Path(args.output_dir).resolve()}")
    return args.output_dir


if __name__ == "__main__":
    main()
