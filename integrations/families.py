"""The HF model families hf_fp8 patches, in one table: adding a family is one entry plus its tests.

Every family here has Llama's structure (the decoder layer, MLP and causal-LM forwards are
HF's Llama ones under another name), so one attention, decoder, MLP and loss forward serves
them all; an entry names the classes and says what differs:

- ``qk_norm``: an RMSNorm over head_dim applied to q and k after their projections and before
  RoPE (``q_norm``/``k_norm``, Qwen3);
- ``sliding_window``: where the attention reads its window, passed to the attention function
  as HF's own forward does: ``"config"`` (``config.sliding_window`` for every layer, Mistral),
  ``"attribute"`` (the attention module's ``sliding_window``, set per layer from
  ``config.layer_types``, Qwen2/Qwen3), or ``None`` (no window, Llama);
- biases (Qwen2's q/k/v) need nothing here: FP8 layers keep a linear's bias wherever it has one.

A model whose ``config.model_type`` is not in the table still gets FP8 linear layers; ``convert``
warns once with the list of what it did not patch (RoPE, loss, fused norms and SwiGLU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

__all__ = ["ModelFamily", "FAMILIES", "family_of", "supported_model_types"]


@dataclass(frozen=True)
class ModelFamily:
    """One HF model family with Llama's structure; class names follow HF's ``<Prefix><Part>``."""

    model_type: str
    prefix: str
    qk_norm: bool = False
    sliding_window: Literal["config", "attribute"] | None = None
    differs: str = ""

    @property
    def causal_lm(self) -> str:
        return f"{self.prefix}ForCausalLM"

    @property
    def attention(self) -> str:
        return f"{self.prefix}Attention"

    @property
    def decoder(self) -> str:
        return f"{self.prefix}DecoderLayer"

    @property
    def norm(self) -> str:
        return f"{self.prefix}RMSNorm"

    @property
    def mlp(self) -> str:
        return f"{self.prefix}MLP"

    def window_of(self, attention: nn.Module) -> int | None:
        """The sliding window HF's own attention forward passes for this module (None: none)."""
        if self.sliding_window == "config":
            return getattr(attention.config, "sliding_window", None)
        if self.sliding_window == "attribute":
            return getattr(attention, "sliding_window", None)
        return None


FAMILIES: dict[str, ModelFamily] = {
    f.model_type: f
    for f in (
        ModelFamily("llama", "Llama", differs="the reference structure"),
        ModelFamily(
            "mistral",
            "Mistral",
            sliding_window="config",
            differs="explicit head_dim; one sliding window for every layer (config.sliding_window)",
        ),
        ModelFamily(
            "qwen2",
            "Qwen2",
            sliding_window="attribute",
            differs="bias on q/k/v; per-layer sliding windows (config.layer_types, off by default)",
        ),
        ModelFamily(
            "qwen3",
            "Qwen3",
            qk_norm=True,
            sliding_window="attribute",
            differs="RMSNorm over head_dim on q and k before RoPE; explicit head_dim; per-layer sliding windows",
        ),
    )
}


def family_of(model: nn.Module) -> ModelFamily | None:
    """The family of an HF model (or of the HF model a PEFT model wraps), by ``config.model_type``."""
    config = getattr(model, "config", None)
    if config is None:
        get_base = getattr(model, "get_base_model", None)
        config = getattr(get_base(), "config", None) if callable(get_base) else None
    return FAMILIES.get(getattr(config, "model_type", None))


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)
