"""Which parts of a step ran in FP8: per FP8 layer, its forward casts (first passes), recomputed
forwards (activation checkpointing) and backward passes, and per attention module, whether the FP8
kernel ran or why it fell back, since the last reset.

Silent fallbacks are what this is for: an FP8 path that quietly runs in BF16 under recompute, or an
attention that falls back on every padded batch, shows as a zero here. The counters are Python
integers on the modules, bumped where the FP8 work is launched (no device work, no sync).
"""

from __future__ import annotations

import dataclasses

from torch import nn

__all__ = ["Fp8Coverage", "fp8_coverage", "reset_fp8_coverage"]

# counter attributes on Fp8Linear / attention modules (absent: zero)
FORWARD, RECOMPUTE, BACKWARD, ATTENTION = "_fp8_cov_forward", "_fp8_cov_recompute", "_fp8_cov_backward", "_fp8_cov_attn"


def count(module: nn.Module, counter: str) -> None:
    module.__dict__[counter] = module.__dict__.get(counter, 0) + 1


def count_attention(module: nn.Module, outcome: str) -> None:
    """``outcome``: ``"fp8"`` or the fallback's reason."""
    seen = module.__dict__.setdefault(ATTENTION, {})
    seen[outcome] = seen.get(outcome, 0) + 1


@dataclasses.dataclass
class Fp8Coverage:
    """Counts since the last reset. ``layers``: name -> (forwards, recomputes, backwards) of each
    FP8 layer; ``attention``: name -> {"fp8" or a fallback reason: calls}; ``dequantized``: the
    frozen layers of a published FP8 checkpoint (:class:`~hf_fp8.frozen_fp8.FrozenFp8Linear`),
    whose GEMMs run on the weight dequantized on the fly, not in FP8."""

    layers: dict[str, tuple[int, int, int]]
    attention: dict[str, dict[str, int]]
    dequantized: list[str] = dataclasses.field(default_factory=list)
    # activation checkpointing in the last training forward: (layers that kept their activations,
    # layers checkpointed, why) per decoder stack (Fp8Config.keep_activations)
    recompute: list[tuple[int, int, str]] = dataclasses.field(default_factory=list)

    @property
    def idle_layers(self) -> list[str]:
        """FP8 layers that ran no forward since the reset."""
        return [n for n, (f, r, _) in self.layers.items() if f + r == 0]

    def summary(self) -> str:
        """One line: how many FP8 layers ran forward / recompute / backward, and the attention."""
        n = len(self.layers)
        fwd = sum(1 for f, _, _ in self.layers.values() if f)
        rec = sum(1 for _, r, _ in self.layers.values() if r)
        bwd = sum(1 for _, _, b in self.layers.values() if b)
        line = f"FP8 layers: {fwd}/{n} ran their forward in FP8, {bwd}/{n} their backward"
        if rec:
            line += f", {rec}/{n} their recomputed forward"
        if self.attention:
            fp8 = sum(1 for seen in self.attention.values() if seen.get("fp8"))
            line += f"; FP8 attention: {fp8}/{len(self.attention)} modules ran the FP8 kernel"
            reasons = sorted({r for seen in self.attention.values() for r in seen if r != "fp8"})
            if reasons:
                line += f" (fell back for: {'; '.join(reasons)})"
        for kept, checkpointed, reason in self.recompute:
            if checkpointed:
                line += (
                    f"; activation checkpointing: {kept}/{checkpointed} layers kept their activations, "
                    f"{checkpointed - kept} recomputed ({reason})"
                )
        if self.dequantized:
            line += (
                f"; {len(self.dequantized)} frozen FP8-weight layers (published checkpoint) compute on their "
                "dequantized weights, not FP8 GEMMs"
            )
        return line

    def __str__(self) -> str:
        return self.summary()


def fp8_coverage(model: nn.Module, reset: bool = False) -> Fp8Coverage:
    """What ran in FP8 in ``model`` since the last :func:`reset_fp8_coverage` (or since conversion);
    ``reset=True`` starts a new count after reading this one."""
    from hf_fp8.frozen_fp8 import FrozenFp8Linear
    from hf_fp8.linear import Fp8Linear

    layers, attention, dequantized = {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, Fp8Linear):
            d = m.__dict__
            layers[name] = (d.get(FORWARD, 0), d.get(RECOMPUTE, 0), d.get(BACKWARD, 0))
        elif isinstance(m, FrozenFp8Linear) and m.has_fp8_weight:
            if m.fp8_gemm:  # blockwise FP8 GEMMs on the codes: counted like an FP8 layer
                d = m.__dict__
                layers[name] = (d.get(FORWARD, 0), d.get(RECOMPUTE, 0), d.get(BACKWARD, 0))
            else:
                dequantized.append(name)
        elif ATTENTION in m.__dict__ or _uses_fp8_attention(m):
            attention[name] = dict(m.__dict__.get(ATTENTION, {}))
    from hf_fp8.recompute import recompute_plans

    recompute = [(p.last_kept, p.last_checkpointed, p.last_reason) for p in recompute_plans(model)]
    if reset:
        reset_fp8_coverage(model)
    return Fp8Coverage(layers, attention, dequantized, recompute)


def reset_fp8_coverage(model: nn.Module) -> None:
    for m in model.modules():
        for counter in (FORWARD, RECOMPUTE, BACKWARD, ATTENTION):
            m.__dict__.pop(counter, None)


def _uses_fp8_attention(module: nn.Module) -> bool:
    """An attention module of a model whose attention implementation is hf_fp8's."""
    config = getattr(module, "config", None)
    return (
        type(module).__name__.endswith("Attention")
        and config is not None
        and getattr(config, "_attn_implementation", None) == "hf_fp8"
    )
