"""Tiny random Llama models built in code (nothing is downloaded)."""

from __future__ import annotations

import copy

import torch

TINY = dict(
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


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY, **overrides})


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(copy.deepcopy(tiny_llama_config(**overrides)))


FAMILY_CLASSES = {  # model_type -> (config class, causal-LM class), in transformers
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def tiny_family(model_type: str, seed: int = 0, **overrides):
    """A tiny random model of one HF family (the shapes of ``tiny_llama``, head_dim 32, Qwen's
    and Mistral's rope_theta 1e6; Qwen2 keeps its q/k/v biases, Qwen3 its q/k norms)."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in FAMILY_CLASSES[model_type])
    kw = {**TINY, "head_dim": 32, "tie_word_embeddings": False}
    if model_type != "llama":
        kw["rope_theta"] = 1e6
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**kw, **overrides}))


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


def bigram_batches(batch: int, seq: int, vocab: int, seed: int = 0):
    """Sequences from a fixed random bigram chain (90% follow it): a task a small Llama learns fast."""
    g = torch.Generator().manual_seed(seed)
    successor = torch.randperm(vocab, generator=g)
    while True:
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, seq):
            follow = torch.rand(batch, generator=g) < 0.9
            ids[:, t] = torch.where(follow, successor[ids[:, t - 1]], torch.randint(0, vocab, (batch,), generator=g))
        yield ids


def train_losses(model, optimizer, steps: int, *, batch: int = 8, seq: int = 32, vocab: int = 512) -> list[float]:
    """Train ``model`` on :func:`bigram_batches` for ``steps`` steps; the loss of each step."""
    data = bigram_batches(batch, seq, vocab, seed=0)
    losses = []
    for _ in range(steps):
        ids = next(data)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def sgd_steps(model, batches, steps: int, *, lr: float = 0.05, device=None, after_step=None) -> list[float]:
    """``steps`` SGD steps of ``model`` on batches drawn from the iterator ``batches`` (moved to
    ``device``); ``after_step(model)`` runs after each; the loss of each step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        ids = next(batches)
        ids = ids if device is None else ids.to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if after_step is not None:
            after_step(model)
    return losses


def losses_with_norms_fused_and_not(
    model, twin, batches, lr: float = 1e-3, switch: tuple = ("hf_fp8.norm_ops", "ENABLED")
) -> tuple[list, list]:
    """Train ``model`` with each RMSNorm inside its consumers' FP8 casts (``hf_fp8.norm_ops``) and
    ``twin`` with the norms on their own, on the same ``batches`` (AdamW); both runs' losses.
    ``switch``: (module, flag) turned off for ``twin`` (another fused path to compare)."""
    import importlib

    module = importlib.import_module(switch[0])
    opts = [torch.optim.AdamW(m.parameters(), lr=lr) for m in (model, twin)]
    losses: tuple[list, list] = ([], [])
    for ids in batches:
        for fused, m, opt, out in zip((True, False), (model, twin), opts, losses):
            setattr(module, switch[1], fused)
            try:
                loss = m(input_ids=ids, labels=ids).loss
                loss.backward()
            finally:
                setattr(module, switch[1], True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(loss.detach())
    return losses


def enable_activation_checkpointing(model, use_reentrant: bool | None = None) -> None:
    """HF's activation checkpointing under its current name (transformers >= 5.25), or its old one
    (5.17, the oldest supported, has only ``gradient_checkpointing_enable``; 5.25 deprecates it)."""
    kwargs = None if use_reentrant is None else {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_activation_checkpointing(model) -> None:
    """The counterpart of :func:`enable_activation_checkpointing`."""
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()
