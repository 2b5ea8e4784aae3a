"""Tiny random Llama models built in code (nothing is downloaded)."""

from __future__ import annotations

import copy

import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        rope_theta=500000.0,
        attn_implementation="eager",  # SDPA in BF16 is very slow on CPUs (see CPU-NOTES)
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(copy.deepcopy(tiny_llama_config(**overrides)))


def llama3_8b_config_on_meta(num_layers: int = 2):
    """Llama-3-8B layer shapes (hidden 4096, MLP 14336, 32/8 heads, vocab 128256)."""
    return tiny_llama_config(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )
