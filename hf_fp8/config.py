"""Recipes: what an FP8 training run quantizes, how, and which modules it touches.

A config is a frozen dataclass: hashable, safe to share between modules and under
``torch.compile``, and changed only through :func:`dataclasses.replace`, which re-runs
the validation below. Every invalid value raises ``ValueError`` naming the field, the
value received and the values allowed.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["Fp8Config", "Fp8Format", "Recipe", "AmaxComputeAlgo", "NonFinitePolicy"]


class _StrEnum(str, enum.Enum):
    """An enum whose members compare equal to, and serialize as, their string value."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, field: str, value: Any):
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"Fp8Config.{field}: got {value!r}; allowed values are {allowed}") from None


class Recipe(_StrEnum):
    """How scales are chosen.

    - ``tensorwise``: one scale per tensor from the tensor's *current* amax (dynamic
      scaling). Needs a reduction over the whole tensor before the cast; our kernels do
      it in two passes with no host synchronization.
    - ``rowwise``: one scale per row of each GEMM operand (per token for activations and
      gradients, per output channel for weights), E4M3 for every operand. More accurate
      with outliers; the per-row scales are applied in the GEMM epilogue.
    - ``delayed``: one scale per tensor from a history of past amaxes (TransformerEngine's
      recipe). The cast needs no reduction before it, so quantization is a single pass that
      also records the current amax into the history.
    - ``blockwise``: DeepSeek-V3's scheme: activations and gradients in 1x128 tiles, weights
      in 128x128 blocks, E4M3 everywhere, one FP32 scale per tile or block. The weights'
      blocks are those of transformers' fine-grained FP8 checkpoints (``weight_block_size``
      [128, 128]), so :func:`hf_fp8.save_fp8` exports exactly the quantization the model
      trained against. Layers whose dimensions are not multiples of 128 stay in high precision.
    """

    TENSORWISE = "tensorwise"
    ROWWISE = "rowwise"
    DELAYED = "delayed"
    BLOCKWISE = "blockwise"

    @property
    def per_tensor(self) -> bool:
        """One scale per tensor (tensorwise, delayed): what the fused norm and SwiGLU casts take."""
        return self in (Recipe.TENSORWISE, Recipe.DELAYED)

    def short_str(self) -> str:
        return {"tensorwise": "ten", "rowwise": "row", "delayed": "dly", "blockwise": "blk"}[self.value]


class Fp8Format(_StrEnum):
    """The two OCP FP8 formats Hopper's tensor cores take."""

    E4M3 = "e4m3"  # max 448, 3 mantissa bits: forward operands
    E5M2 = "e5m2"  # max 57344, 2 mantissa bits: gradients, which have wider range

    @property
    def dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self is Fp8Format.E4M3 else torch.float8_e5m2

    @property
    def max(self) -> float:
        return float(torch.finfo(self.dtype).max)


class AmaxComputeAlgo(_StrEnum):
    """How the delayed recipe turns its amax history into one amax."""

    MAX = "max"  # the largest amax in the window: safe against spikes
    MOST_RECENT = "most_recent"  # the previous step's amax: tracks fast changes


class NonFinitePolicy(_StrEnum):
    """What happens when an FP8 cast sees inf or NaN.

    The cast never produces an inf/NaN *scale*; non-finite input values come out as NaN
    (so the loss shows them) and the module records the event. ``record`` keeps the
    check on the device (no host synchronization; read it with
    :func:`hf_fp8.nonfinite_modules`); ``raise`` synchronizes after every cast and raises
    :class:`hf_fp8.NonFiniteError` naming the module, which is what you want while debugging.
    """

    RECORD = "record"
    RAISE = "raise"


_FIELDS_WITH_ENUMS = {
    "recipe": Recipe,
    "grad_format": Fp8Format,
    "amax_compute_algo": AmaxComputeAlgo,
    "nonfinite": NonFinitePolicy,
}


MAX_MARGIN = 8  # see Fp8Config.margin


@dataclasses.dataclass(frozen=True)
class Fp8Config:
    """Configuration of FP8 training for :func:`hf_fp8.convert`.

    Args:
        recipe (`str`, `Recipe` or `None`, *optional*, defaults to `"delayed"`):
            ``"delayed"``, ``"tensorwise"``, ``"rowwise"`` or ``"blockwise"`` (see :class:`Recipe`), or ``None`` for
            full-BF16 mode: no FP8, BF16 parameters and gradients, with FP32 RoPE, logits and loss
            (use :class:`hf_fp8.optim.AdamW` for FP32 optimizer states).
        grad_format (`str`, *optional*):
            FP8 format of the output gradient: ``"e5m2"`` (default for tensorwise and delayed,
            TransformerEngine's HYBRID format) or ``"e4m3"`` (default and only choice for rowwise
            and blockwise, whose per-row or per-tile scales make E4M3's smaller range enough). Forward operands are always E4M3.
        amax_history_len (`int`, *optional*, defaults to 16):
            Length of the delayed recipe's amax history (ignored by the other recipes).
        amax_compute_algo (`str`, *optional*, defaults to `"max"`):
            ``"max"`` or ``"most_recent"``: how the delayed recipe reads its history.
        margin (`int`, *optional*, defaults to 0):
            Delayed recipe: scales are divided by ``2**margin`` to leave headroom for amax growth
            (0 to 8: each unit costs one of E4M3's 18 binades at the small end).
        use_fast_accum (`bool`, *optional*, defaults to `False`):
            Let the forward GEMM use Hopper's fast FP8 accumulation (faster, slightly less
            accurate than FP32 accumulation; the CPU emulation always accumulates in FP32).
        auto_filter (`bool`, *optional*, defaults to `True`):
            Keep in high precision the layers where FP8 does not pay off: the output embedding
            (``lm_head``) and layers below the per-recipe size thresholds measured on an H100
            (see :mod:`hf_fp8.filter`), unless they share their input with a converted layer
            (k/v with q, up with gate). Layers with a dimension not divisible by 16 are always
            kept, since the FP8 GEMM cannot take them.
        include (`tuple[str, ...]`, *optional*, defaults to `()`):
            Shell-style patterns (``fnmatch``) of module names to consider; empty means all.
        exclude (`tuple[str, ...]`, *optional*, defaults to `()`):
            Shell-style patterns of module names never to convert (wins over ``include``).
        nonfinite (`str`, *optional*, defaults to `"record"`):
            ``"record"`` or ``"raise"`` (see :class:`NonFinitePolicy`).
        fp32_rope (`bool`, *optional*, defaults to `True`):
            For supported HF model families (Llama, Mistral, Qwen2, Qwen3), also rotate q/k in
            FP32 and keep the RoPE buffers FP32 (:func:`hf_fp8.patch_rope`).
        fp32_loss (`bool`, *optional*, defaults to `True`):
            For supported HF causal LMs (the same families), compute logits and loss in FP32 with the
            chunked linear + cross-entropy, never materializing full logits in training
            (:func:`hf_fp8.patch_loss`).
        fp8_weights (`bool`, *optional*, defaults to `False`):
            Store the converted layers' weights in FP8 only (E4M3, one per-tensor scale), frozen,
            with no high-precision copy: half the memory of BF16 base weights, for LoRA and other
            adapter fine-tuning where the base does not train. ``save_pretrained`` still writes
            the dequantized weights in their original dtype. Needs a per-tensor recipe
            (``"tensorwise"`` or ``"delayed"``): the input-gradient GEMM reads the weight scaled
            along the other axis, which per-row scales cannot give without a high-precision copy.

        save_weight_transpose (`bool`, *optional*, defaults to `False`):
            ``True`` writes each weight's transposed FP8 copy (what the input-gradient GEMM reads)
            in the forward's cast and keeps it until the backward. ``False`` (the default)
            re-casts it in the backward from the weight with the forward's scale (bit-identical
            results): one byte per FP8 weight element less alive between forward and backward
            (1.4 GB at an 8-layer Llama-3-8B's 24 FP8 layers, 1.75 GB with all 56 decoder
            layers in FP8: peak 0.59x instead of 0.63x stock BF16 on an H100) for one more
            cast per layer and step: 0.1-1.3% of the step time across runs
            (``benchmarks/results/llama_e2e_h100.json``).
        cuda_graph (`bool`, *optional*, defaults to `False`):
            The training steps will be replayed as CUDA graphs (:class:`hf_fp8.CudaGraphStep`,
            the Trainer's ``--fp8_cuda_graph``, which sets it): the auto filter then uses the
            thresholds measured that way (:data:`hf_fp8.filter.GRAPH_THRESHOLDS`). Without host
            launch overhead smaller layers pay in FP8: every decoder linear of a Llama-3.2-1B
            shape, where eager steps keep them all in BF16. Changes which layers are converted,
            nothing else.
        keep_activations (`str` or `int`, *optional*, defaults to `"auto"`):
            Under activation checkpointing (``model.gradient_checkpointing_enable()``), how many
            of the last checkpointed decoder layers keep their activations instead of recomputing
            them in the backward. ``"auto"``: as many as fit in the memory the layers' gradients
            take only later in the step, so the peak stays at or below full recompute's (measured
            on the device; nothing is kept on the CPU, with several processes, under gradient
            accumulation or before the first backward: :mod:`hf_fp8.recompute`). ``0``:
            recompute every checkpointed layer (transformers' behaviour); ``n``: the last ``n``,
            whatever memory they take. The results are the same bit for bit either way; only
            speed and memory change. Applies to the families of :mod:`hf_fp8.integrations.families`.

    Example:
        ```python
        >>> import hf_fp8
        >>> cfg = hf_fp8.Fp8Config(recipe="delayed", amax_history_len=32, exclude=("*.k_proj",))
        >>> cfg.short_str()
        'dly:e4m3/e5m2,h32,max'
        >>> hf_fp8.Fp8Config.from_json(cfg.to_json()) == cfg
        True

        ```
    """

    recipe: Recipe | str | None = Recipe.DELAYED
    grad_format: Fp8Format | str | None = None
    amax_history_len: int = 16
    amax_compute_algo: AmaxComputeAlgo | str = AmaxComputeAlgo.MAX
    margin: int = 0
    use_fast_accum: bool = False
    auto_filter: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    nonfinite: NonFinitePolicy | str = NonFinitePolicy.RECORD
    fp32_rope: bool = True
    fp32_loss: bool = True
    fp8_weights: bool = False
    fp8_attention: bool = False
    fused_ops: bool = True
    save_weight_transpose: bool = False
    cuda_graph: bool = False
    keep_activations: str | int = "auto"

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen: set once, here)
        for name, enum_cls in _FIELDS_WITH_ENUMS.items():
            value = getattr(self, name)
            if value is not None:
                set_(name, enum_cls.parse(name, value))
        if self.recipe is None:  # full-BF16 mode: no FP8 anywhere
            if self.grad_format is not None:
                raise ValueError("Fp8Config.grad_format: must be None in full-BF16 mode (recipe=None): there is no FP8")
        elif self.grad_format is None:
            set_("grad_format", Fp8Format.E5M2 if self.recipe.per_tensor else Fp8Format.E4M3)
        if self.recipe in (Recipe.ROWWISE, Recipe.BLOCKWISE) and self.grad_format is not Fp8Format.E4M3:
            raise ValueError(
                f"Fp8Config.grad_format: got {self.grad_format.value!r} with recipe {self.recipe.value!r}; "
                f"{self.recipe.value} scaling "
                "supports only 'e4m3' (the FP8 GEMM with per-row scales takes E4M3 operands)"
            )
        for name in ("amax_history_len", "margin"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"Fp8Config.{name}: got {value!r}; expected an int")
        if self.amax_history_len < 1:
            raise ValueError(f"Fp8Config.amax_history_len: got {self.amax_history_len}; expected an int >= 1")
        if not 0 <= self.margin <= MAX_MARGIN:
            raise ValueError(
                f"Fp8Config.margin: got {self.margin}; expected an int from 0 to {MAX_MARGIN}. Each unit halves the "
                "scale: at 8 a tensor's largest value lands at 448/256 = 1.75 and E4M3 keeps only 10 of its 18 "
                "binades (2^-9 to 2^8.8); beyond that small activations flush to zero (16 and more gave all-zero "
                "casts; 100 and more NaN losses)"
            )
        for name in (
            "use_fast_accum",
            "auto_filter",
            "fp32_rope",
            "fp32_loss",
            "fp8_weights",
            "fp8_attention",
            "fused_ops",
            "save_weight_transpose",
            "cuda_graph",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Fp8Config.{name}: got {getattr(self, name)!r}; expected True or False")
        keep = self.keep_activations
        if isinstance(keep, str) and keep.strip().isdigit():  # from a CLI flag or hand-written JSON
            keep = int(keep)
            set_("keep_activations", keep)
        if not (keep == "auto" or (isinstance(keep, int) and not isinstance(keep, bool) and keep >= 0)):
            raise ValueError(
                f"Fp8Config.keep_activations: got {keep!r}; expected 'auto' (keep as many layers' activations as "
                "the memory of gradients still to come allows), 0 (recompute every checkpointed layer) or a number "
                "of last layers to keep"
            )
        if self.fp8_attention and self.recipe is None:
            raise ValueError(
                "Fp8Config.fp8_attention: full-BF16 mode (recipe=None) means no FP8; use a recipe with FP8 attention"
            )
        if self.fp8_weights and self.recipe is None:
            raise ValueError("Fp8Config.fp8_weights: full-BF16 mode (recipe=None) has no FP8 layers to store in FP8")
        if self.fp8_weights and self.recipe is Recipe.BLOCKWISE:
            raise ValueError(
                "Fp8Config.fp8_weights: needs recipe 'tensorwise' or 'delayed'. For adapters on blockwise FP8 "
                "weights, load a block-scaled checkpoint with hf_fp8.from_pretrained (its codes and block scales stay "
                "the frozen weights)."
            )
        if self.fp8_weights and self.recipe is Recipe.ROWWISE:
            raise ValueError(
                "Fp8Config.fp8_weights: needs recipe 'tensorwise' or 'delayed'. With 'rowwise', the input-gradient "
                "GEMM needs the weight scaled per column as well as per row, which an FP8-only weight cannot give "
                "without requantizing (a second rounding)."
            )
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not all(isinstance(p, str) and p for p in value):
                raise ValueError(f"Fp8Config.{name}: got {value!r}; expected a tuple of non-empty name patterns")
            set_(name, tuple(value))

    # ---- derived properties -------------------------------------------------------------
    @property
    def forward_format(self) -> Fp8Format:
        return Fp8Format.E4M3

    @property
    def full_bf16(self) -> bool:
        """Full-BF16 mode (``recipe=None``): BF16 parameters and gradients, FP32 RoPE, logits,
        loss and optimizer states, no FP8."""
        return self.recipe is None

    def short_str(self) -> str:
        """Compact description for ``repr``: recipe, formats, and the delayed recipe's history."""
        if self.recipe is None:
            return "full-bf16"
        s = f"{self.recipe.short_str()}:{self.forward_format.value}/{self.grad_format.value}"
        if self.recipe is Recipe.DELAYED:
            s += f",h{self.amax_history_len},{self.amax_compute_algo.value}"
            if self.margin:
                s += f",m{self.margin}"
        if self.use_fast_accum:
            s += ",fast_accum"
        if self.fp8_weights:
            s += ",fp8_weights"
        if self.fp8_attention:
            s += ",fp8_attention"
        if self.save_weight_transpose:
            s += ",saved_wt"
        if self.cuda_graph:
            s += ",cuda_graph"
        return s

    # ---- serialization ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = (
                value.value if isinstance(value, enum.Enum) else list(value) if isinstance(value, tuple) else value
            )
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fp8Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Fp8Config: unknown field(s) {unknown}; known fields are {sorted(known)}")
        kwargs = dict(data)
        for name in ("include", "exclude"):
            if name in kwargs and isinstance(kwargs[name], list):
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> Fp8Config:
        """Build from a JSON string or the path of a JSON file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            with open(text_or_path) as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_name(cls, name: str | Recipe, **overrides: Any) -> Fp8Config:
        """A named recipe with optional overrides: ``Fp8Config.from_name("rowwise")``."""
        return cls(recipe=name, **overrides)
