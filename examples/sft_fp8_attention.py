"""Supervised fine-tuning batches with FP8 attention: padded or packed, Llama, Mistral, Qwen2 or Qwen3.

    python examples/sft_fp8_attention.py                          # padded batches, tiny Llama, CPU is fine
    python examples/sft_fp8_attention.py --batching packed        # DataCollatorWithFlattening, no padding
    python examples/sft_fp8_attention.py --model_type qwen3 --max_steps 60
    python examples/sft_fp8_attention.py --model_name_or_path Qwen/Qwen2.5-0.5B --bf16 --batching packed

Each example is one line of the text (variable lengths, as SFT samples are). ``--batching padded``
pads each batch to its longest line (attention mask, labels -100 on the padding);
``--batching packed`` concatenates the lines of a batch with position ids that restart per line
(transformers' ``DataCollatorWithFlattening``). Both masks reach FP8 attention
(``--fp8_attention``) as per-query key ranges: the kernel runs on them, and the coverage line the
Trainer logs after the first step says so (``attention: ... ran the FP8 kernel``). Every
``transformers.TrainingArguments`` option works; hf_fp8 adds ``--fp8``, ``--fp8_attention``, ...
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from transformers import DataCollatorWithFlattening, HfArgumentParser

import hf_fp8

sys.path.insert(0, str(Path(__file__).parent))
from _shared import DEFAULT_TEXT, build_tokenizer, with_recipe_defaults  # noqa: E402

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass
class ScriptArguments:
    model_name_or_path: str | None = dataclasses.field(
        default=None, metadata={"help": "A checkpoint to fine-tune; default: a tiny model built in code."}
    )
    model_type: str = dataclasses.field(
        default="llama", metadata={"help": f"The tiny model's family: {', '.join(FAMILIES)}."}
    )
    batching: str = dataclasses.field(default="padded", metadata={"help": "padded or packed."})
    text_file: str = dataclasses.field(default=str(DEFAULT_TEXT), metadata={"help": "Plain text, one sample per line."})
    max_len: int = dataclasses.field(default=128, metadata={"help": "Samples are cut to this many tokens."})


TINY_DEFAULTS = [
    "--output_dir", "runs/sft_fp8_attention", "--max_steps", "30", "--per_device_train_batch_size", "8",
    "--learning_rate", "3e-3", "--logging_steps", "5", "--report_to", "none", "--save_strategy", "no",
    "--fp8_auto_filter", "false", "--fp8_attention", "true", "--seed", "0", "--remove_unused_columns", "false",
]  # fmt: skip
ANY_DEFAULTS = [
    "--output_dir", "runs/sft_fp8_attention", "--report_to", "none", "--fp8_attention", "true",
    "--remove_unused_columns", "false",
]  # fmt: skip


def tiny_model(model_type: str, vocab_size: int):
    """A small model of one family, head_dim 64 (FP8 attention takes 64 or 128)."""
    import transformers

    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    if model_type not in names:
        raise ValueError(f"--model_type {model_type!r}: one of {', '.join(FAMILIES)}")
    config_cls = getattr(transformers, f"{names[model_type]}Config")
    model_cls = getattr(transformers, f"{names[model_type]}ForCausalLM")
    cfg = config_cls(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, vocab_size=vocab_size, max_position_embeddings=512, tie_word_embeddings=False,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    return model_cls(cfg)


class Lines(torch.utils.data.Dataset):
    """One tokenized line of the text per sample (at least 8 tokens, at most ``max_len``)."""

    def __init__(self, text: str, tokenizer, max_len: int) -> None:
        ids = [tokenizer(line)["input_ids"][:max_len] for line in text.splitlines() if line.strip()]
        self.samples = [s for s in ids if len(s) >= 8]
        if not self.samples:
            raise ValueError("no line of the text has 8 tokens or more")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.samples[i]}


def pad_right(pad_id: int):
    """Collate samples into a right-padded batch: attention mask, labels -100 on the padding."""

    def collate(samples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(samples), n), dtype=torch.long)
        for row, s in enumerate(samples):
            ids[row, : len(s["input_ids"])] = torch.tensor(s["input_ids"])
            mask[row, : len(s["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    return collate


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    embedded = "--model_name_or_path" not in argv
    defaults = with_recipe_defaults(argv, TINY_DEFAULTS if embedded else ANY_DEFAULTS)
    parser = HfArgumentParser((ScriptArguments, hf_fp8.TrainingArguments))
    script, args = parser.parse_args_into_dataclasses(args=defaults + argv)
    if script.batching not in ("padded", "packed"):
        raise ValueError(f"--batching {script.batching!r}: padded or packed")
    text = Path(script.text_file).read_text()
    if script.model_name_or_path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path, dtype="auto")
    else:
        tokenizer = build_tokenizer(text)
        model = tiny_model(script.model_type, (len(tokenizer) + 15) // 16 * 16)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = DataCollatorWithFlattening() if script.batching == "packed" else pad_right(pad_id)
    trainer = hf_fp8.Trainer(
        model=model, args=args, train_dataset=Lines(text, tokenizer, script.max_len), data_collator=collator
    )
    if trainer.fp8_report is not None:
        print(trainer.fp8_report, flush=True)
    result = trainer.train()
    coverage = hf_fp8.fp8_coverage(trainer.model)
    print(coverage.summary())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if len(losses) >= 2:
        print(f"loss: first logged {losses[0]:.4f}, last logged {losses[-1]:.4f}")
    print(f"{script.batching} batches, mean training loss over {result.global_step} steps: {result.training_loss:.4f}")
    return {"losses": losses, "coverage": coverage}


if __name__ == "__main__":
    main()
