"""TRL's trainers with one flag: SFT, DPO or GRPO with ``--fp8 delayed|tensorwise|rowwise|blockwise`` (or ``--full_bf16``).

    python examples/trl_finetune.py --trainer sft          # tiny Llama + public-domain text, CPU is fine
    python examples/trl_finetune.py --trainer dpo --fp8 rowwise
    python examples/trl_finetune.py --trainer grpo --max_steps 20
    python examples/trl_finetune.py --trainer sft --model_name_or_path Qwen/Qwen2.5-0.5B --fp8 rowwise \\
        --per_device_train_batch_size 4 --max_steps 200 --output_dir runs/sft-fp8

Two lines make a TRL trainer honour hf_fp8's flags::

    Fp8SFTConfig = hf_fp8.make_training_arguments_class(trl.SFTConfig)   # --fp8, --full_bf16, ...
    class Fp8SFTTrainer(hf_fp8.Fp8TrainerMixin, trl.SFTTrainer): ...

The model is given as a path or Hub id (TRL's idiom; the embedded tiny Llama is saved to a folder
first). DPO's reference model gets the policy's recipe. TRL computes these losses itself with its
fused LM head (FP32 logits in chunks), which hf_fp8 says once (``hf_fp8.TrlLossWarning``).
Needs ``pip install "hf_fp8[trl]"``.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import torch
from transformers import HfArgumentParser

import hf_fp8

sys.path.insert(0, str(Path(__file__).parent))
from _shared import DEFAULT_TEXT, load, with_recipe_defaults  # noqa: E402


@dataclasses.dataclass
class ScriptArguments:
    trainer: str = dataclasses.field(default="sft", metadata={"help": "sft, dpo or grpo."})
    model_name_or_path: str | None = dataclasses.field(
        default=None, metadata={"help": "A checkpoint or Hub id; default: a tiny Llama built in code."}
    )
    text_file: str = dataclasses.field(default=str(DEFAULT_TEXT), metadata={"help": "Plain-text data."})


TRAINERS = {
    "sft": ("SFTConfig", "SFTTrainer"),
    "dpo": ("DPOConfig", "DPOTrainer"),
    "grpo": ("GRPOConfig", "GRPOTrainer"),
}
# Defaults for the embedded tiny model on a CPU; anything on the command line overrides them.
TINY_DEFAULTS = [
    "--max_steps", "10", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "2",
    "--report_to", "none", "--save_strategy", "no", "--fp8_auto_filter", "false",
    "--seed", "0", "--bf16", "false", "--gradient_checkpointing", "false",
]  # fmt: skip
ANY_DEFAULTS = ["--report_to", "none"]


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.;])\s+", text) if len(s.split()) >= 8]


def datasets_for(kind: str, text: str):
    """Public-domain sentences as SFT text, DPO pairs (the true continuation against another
    sentence's) and GRPO prompts."""
    from datasets import Dataset

    sentences = _sentences(text)
    if kind == "sft":
        return Dataset.from_dict({"text": sentences})
    heads = [" ".join(s.split()[:4]) for s in sentences]
    tails = [" " + " ".join(s.split()[4:12]) for s in sentences]
    if kind == "dpo":
        return Dataset.from_dict({"prompt": heads, "chosen": tails, "rejected": tails[1:] + tails[:1]})
    return Dataset.from_dict({"prompt": heads})


def make_vocabulary_reward(text: str):
    """GRPO's reward: the fraction of a completion's words that occur in the text."""
    vocabulary = set(re.findall(r"[a-z]+", text.lower()))

    def vocabulary_reward(completions, **kwargs):
        scores = []
        for c in completions:
            words = re.findall(r"[a-z]+", c.lower())
            scores.append(sum(w in vocabulary for w in words) / max(1, len(words)))
        return scores

    return vocabulary_reward


def main(argv: list[str] | None = None):
    import trl

    argv = list(sys.argv[1:] if argv is None else argv)
    kind = argv[argv.index("--trainer") + 1] if "--trainer" in argv else "sft"
    if kind not in TRAINERS:
        raise SystemExit(f"--trainer: got {kind!r}; expected one of {sorted(TRAINERS)}")
    config_name, trainer_name = TRAINERS[kind]
    config_cls = hf_fp8.make_training_arguments_class(getattr(trl, config_name))
    trainer_cls = type(f"Fp8{trainer_name}", (hf_fp8.Fp8TrainerMixin, getattr(trl, trainer_name)), {})

    embedded = "--model_name_or_path" not in argv
    defaults = with_recipe_defaults(argv, TINY_DEFAULTS if embedded else ANY_DEFAULTS)
    defaults = ["--output_dir", f"runs/trl_{kind}", *defaults]
    if kind == "grpo":
        defaults += ["--max_completion_length", "12", "--num_generations", "4", "--generation_batch_size", "4"]
    else:
        defaults += ["--max_length", "64"]
    script, args = HfArgumentParser((ScriptArguments, config_cls)).parse_args_into_dataclasses(args=defaults + argv)
    text = Path(script.text_file).read_text()

    model_path = script.model_name_or_path
    tokenizer = None
    if model_path is None:  # the tiny Llama, saved as a checkpoint folder: TRL loads models by path
        model, tokenizer = load(None, text, torch.bfloat16 if args.full_bf16 else None)
        model_path = str(Path(args.output_dir) / "initial-model")
        model.save_pretrained(model_path)
        tokenizer.save_pretrained(model_path)

    kwargs = dict(model=model_path, args=args, train_dataset=datasets_for(kind, text), processing_class=tokenizer)
    if kind == "grpo":
        kwargs["reward_funcs"] = make_vocabulary_reward(text)
    trainer = trainer_cls(**kwargs)
    if trainer.fp8_report is not None:
        print(trainer.fp8_report, flush=True)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"{kind}: {trainer.state.global_step} steps, logged losses {[round(v, 4) for v in losses]}")
    trainer.save_model(args.output_dir)
    print(f"saved a stock Hugging Face checkpoint to {Path(args.output_dir).resolve()}")
    return trainer


if __name__ == "__main__":
    main()
