"""What the examples share: a tokenizer built locally, a tiny Llama, and a text dataset.

Nothing is downloaded: with no ``--model_name_or_path`` the examples train a small Llama built
from a config, with a byte-level BPE tokenizer trained in a second on the public-domain text
in ``examples/data/public_domain.txt``.
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_TEXT = Path(__file__).parent / "data" / "public_domain.txt"


def build_tokenizer(text: str, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_llama(vocab_size: int, dtype: torch.dtype | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        rope_theta=500000.0,
        attn_implementation="eager",
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    return model.to(dtype) if dtype is not None else model


def load(model_name_or_path: str | None, text: str, dtype: torch.dtype | None = None):
    """(model, tokenizer): a checkpoint if given, else the tiny Llama and a tokenizer trained on ``text``."""
    if model_name_or_path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype or "auto"), tokenizer
    tokenizer = build_tokenizer(text)
    vocab = (len(tokenizer) + 15) // 16 * 16  # a multiple of 16: the FP8 GEMM's rule
    return tiny_llama(vocab, dtype), tokenizer


def with_recipe_defaults(argv: list[str], defaults: list[str]) -> list[str]:
    """The scripts' default arguments for this command line: hf_fp8's default recipe unless
    ``--fp8`` or ``--full_bf16`` is given (said on stdout, with how to choose another or none),
    and no FP8 flag under ``--full_bf16``."""
    import hf_fp8

    defaults = list(defaults)
    if "--full_bf16" in argv and "--fp8_auto_filter" in defaults:  # an FP8 flag: full-BF16 has no FP8 layers
        i = defaults.index("--fp8_auto_filter")
        del defaults[i : i + 2]
    if "--fp8" not in argv and "--full_bf16" not in argv:
        default = hf_fp8.Fp8Config().recipe.value
        print(f"FP8 recipe: {default} (hf_fp8's default; --fp8 rowwise|tensorwise to choose, --fp8 none for BF16)")
        defaults += ["--fp8", default]
    return defaults


class TextBlocks(torch.utils.data.Dataset):
    """The text tokenized once and cut into ``seq_len``-token causal-LM examples."""

    def __init__(self, text: str, tokenizer, seq_len: int) -> None:
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        n = max(1, (len(ids) - 1) // seq_len)
        self.blocks = [ids[i * seq_len : (i + 1) * seq_len] for i in range(n) if len(ids[i * seq_len :]) >= seq_len]
        if not self.blocks:
            raise ValueError(f"the text has {len(ids)} tokens, fewer than --seq_len {seq_len}")

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}
