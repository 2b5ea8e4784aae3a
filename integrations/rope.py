"""FP32 RoPE for HF Llama-family models: patch the rotary path per instance, reversibly.

Stock HF computes cos/sin in FP32, rounds them to the model dtype and rotates q/k there;
``model.to(torch.bfloat16)`` also rounds ``inv_freq``. :func:`patch_rope` instead

- recomputes ``inv_freq``/``original_inv_freq`` in FP32 with HF's own init function (so a
  model already cast to BF16 gets them back) and keeps them FP32 through later
  ``.to(bfloat16)`` / ``.half()`` (the rotary module's ``_apply`` restores them);
- makes the rotary module return the position ids and FP32 ``inv_freq`` instead of cos/sin
  tensors (HF's ``dynamic_rope_update`` still runs, so dynamic/longrope types keep working);
- gives each attention module (``LlamaAttention``, ``Qwen3Attention``, ...) a forward that
  rotates q/k with the FP32 kernel (:mod:`hf_fp8.kernels.rope`), after the family's q/k norms
  where it has them (Qwen3), and hands them to HF's attention interface in the model's
  compute dtype with the family's sliding window, exactly as HF's own forward does otherwise.

Nothing outside the model changes: no module-level function of transformers is replaced,
and the returned :class:`RopePatch` undoes everything. Model families are listed in one
table (:mod:`hf_fp8.integrations.families`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_fp8._backend import use_triton
from hf_fp8.instance_method import bind
from hf_fp8.integrations._kv_cache import cache_arg, take_cache
from hf_fp8.integrations.families import ModelFamily, family_of, supported_model_types
from hf_fp8.linear import linear_on_kept_input, shared_input_linears
from hf_fp8.norm_ops import fused_norm_linears, norm_input_fusable

__all__ = ["RopeInputs", "RopePatch", "patch_rope", "unpatch_rope", "fp32_rope"]

_PINNED = ("inv_freq", "original_inv_freq")


class RopeInputs:
    """What the patched rotary module passes to the attention layers instead of (cos, sin).

    Not iterable on purpose: an unpatched attention forward that tries ``cos, sin = ...``
    gets a clear error instead of silently wrong numerics.
    """

    __slots__ = ("position_ids", "inv_freq", "scaling")

    def __init__(self, position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> None:
        self.position_ids = position_ids
        self.inv_freq = inv_freq
        self.scaling = scaling

    def __iter__(self):
        raise RuntimeError(
            "hf_fp8 patched this model's RoPE (FP32 rotation inside the attention layers), but an attention "
            "forward that expects (cos, sin) received it. Call hf_fp8.unpatch_rope(model) before swapping "
            "attention modules, then patch again."
        )


def fp32_rope(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Autograd-aware FP32 rotation of q (B, S, Hq, D) and k (B, S, Hk, D): Triton on GPUs, torch elsewhere."""
    inv_freq = inv_freq.to(device=q.device)
    position_ids = position_ids.to(device=q.device)
    if use_triton(q):
        from hf_fp8.kernels.rope import apply_rope

        return apply_rope(q, k, position_ids, inv_freq, scaling)
    from hf_fp8.kernels.rope_reference import rope_reference

    return rope_reference(q, k, position_ids, inv_freq, scaling)


# ---- the rotary module --------------------------------------------------------------------
def _fp32_inv_freq(rotary: nn.Module) -> torch.Tensor:
    """``inv_freq`` recomputed in FP32 by HF's own init function for the module's rope type."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    device = rotary.inv_freq.device
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type == "default" and hasattr(type(rotary), "compute_default_rope_parameters"):
        inv_freq, _ = type(rotary).compute_default_rope_parameters(rotary.config)
    elif rope_type in ROPE_INIT_FUNCTIONS:
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](rotary.config)
    else:
        raise ValueError(f"hf_fp8.patch_rope: unknown rope_type {rope_type!r} (known: {sorted(ROPE_INIT_FUNCTIONS)})")
    return inv_freq.to(device=device, dtype=torch.float32)


def _keep_fp32_apply(self: nn.Module, fn: Callable, recurse: bool = True):
    """``nn.Module._apply`` that lets ``.to(device)`` move the RoPE buffers but not change their dtype."""
    saved = {n: getattr(self, n) for n in _PINNED if isinstance(getattr(self, n, None), torch.Tensor)}
    out = type(self)._apply(self, fn, recurse)
    for name, fp32 in saved.items():
        moved = getattr(self, name)
        if moved.dtype != torch.float32:
            setattr(self, name, fp32.to(device=moved.device))
    return out


def _rope_inputs(self, x, position_ids):
    return RopeInputs(position_ids, self.inv_freq, float(getattr(self, "attention_scaling", 1.0)))


_DYNAMIC_UPDATE: list[Callable] = []  # built on first use: transformers is imported lazily


def _rotary_forward(self, x, position_ids):
    """The rotary module's forward: the position ids and FP32 ``inv_freq`` instead of cos/sin,
    after HF's ``dynamic_rope_update`` (dynamic / longrope types update ``inv_freq`` there, as
    in HF's own forward). Module-level, so that a patched model pickles; no_grad as a block, which
    torch.compile traces without a break (a no_grad-decorated function built at run time breaks it)."""
    with torch.no_grad():
        return (_DYNAMIC_UPDATE or _build_dynamic_update())[0](self, x, position_ids)


def _build_dynamic_update() -> list[Callable]:
    """Called by patch_rope (eagerly, before any compile traces the forward), or on the first call
    of a model unpickled in a fresh process."""
    if not _DYNAMIC_UPDATE:
        from transformers.modeling_rope_utils import dynamic_rope_update

        _DYNAMIC_UPDATE.append(dynamic_rope_update(_rope_inputs))
    return _DYNAMIC_UPDATE


# ---- the attention forward ----------------------------------------------------------------
def _attention_forward(
    self,
    hidden_states: torch.Tensor,
    position_embeddings=None,
    attention_mask: torch.Tensor | None = None,
    past_key_values=None,
    _hf_fp8_norm: nn.Module | None = None,
    _hf_fp8_pass_input: bool = False,
    **kwargs,
):
    # _hf_fp8_norm: hidden_states is the input of this RMSNorm, whose output q/k/v read (passed by
    # the decoder layer of hf_fp8.integrations.fused_ops): it runs inside their input cast
    # (hf_fp8.norm_ops) when it can, else first. _hf_fp8_pass_input: return (output, weights,
    # residual), the residual being hidden_states as given, through the norm's node when fused
    # (its gradient then joins the norm's backward kernel, see fused_norm_linears)
    past_key_values = take_cache(past_key_values, kwargs)  # ``cache`` since transformers 5.24
    residual = hidden_states
    if not isinstance(position_embeddings, RopeInputs):
        if _hf_fp8_norm is not None:
            hidden_states = _hf_fp8_norm(hidden_states)
        # called with HF's (cos, sin): behave exactly like the class's own forward
        out = type(self).forward(
            self, hidden_states, position_embeddings, attention_mask,
            **{cache_arg(type(self).forward): past_key_values}, **kwargs,
        )  # fmt: skip
        return (*out, residual) if _hf_fp8_pass_input else out
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    # q, k and v read one input: FP8 layers quantize it once (hf_fp8.linear.shared_input_linears;
    # anything else runs them one by one). (B, S, H, D) views of the projections go to the
    # kernel as they are: no transpose copy.
    projections = (self.q_proj, self.k_proj, self.v_proj)
    if _hf_fp8_norm is not None and norm_input_fusable(_hf_fp8_norm, projections, hidden_states):
        if _hf_fp8_pass_input:
            q, k, v, residual = fused_norm_linears(_hf_fp8_norm, projections, hidden_states, pass_input=True)
        else:
            q, k, v = fused_norm_linears(_hf_fp8_norm, projections, hidden_states)
    else:
        if _hf_fp8_norm is not None:
            hidden_states = _hf_fp8_norm(hidden_states)
        q, k, v = shared_input_linears(projections, hidden_states)
    q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape).transpose(1, 2)
    family: ModelFamily | None = self.__dict__.get("_hf_fp8_family")
    if family is not None and family.qk_norm:  # Qwen3: RMSNorm over head_dim before RoPE, as HF
        q, k = self.q_norm(q), self.k_norm(k)
    if family is not None and family.sliding_window is not None:
        kwargs["sliding_window"] = family.window_of(self)  # what HF's own forward passes
    q, k = fp32_rope(q, k, position_embeddings.position_ids, position_embeddings.inv_freq, position_embeddings.scaling)
    q, k = q.transpose(1, 2), k.transpose(1, 2)

    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)

    modeling = sys.modules[type(self).__module__]
    impl = self.config._attn_implementation
    interface = modeling.ALL_ATTENTION_FUNCTIONS
    if hasattr(interface, "get_interface"):
        attention = interface.get_interface(impl, modeling.eager_attention_forward)
    else:  # older transformers 5.x
        attention = modeling.eager_attention_forward if impl in (None, "eager") else interface[impl]
    attn_output, attn_weights = attention(
        self,
        q,
        k,
        v,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    if RECAST_OPROJ_INPUT and impl in _KEEPS_OUTPUT:  # kept by the attention's backward anyway
        out = linear_on_kept_input(self.o_proj, attn_output)
    else:
        out = self.o_proj(attn_output)
    return (out, attn_weights, residual) if _hf_fp8_pass_input else (out, attn_weights)


# An FP8 o_proj keeps a reference to the attention output (which the attention's backward keeps)
# and re-casts its FP8 transposed copy in the backward, instead of keeping that copy: 33.5 MB
# less per Llama-3-8B layer at B=2, S=4096 for one cast per layer and step. False keeps the copy.
RECAST_OPROJ_INPUT = True
# attention implementations whose backward keeps their output (flash-style: out and logsumexp;
# SDPA's math fallback does not, which then costs the difference between BF16 and FP8 copies)
_KEEPS_OUTPUT = frozenset({"sdpa", "flash_attention_2", "flash_attention_3", "hf_fp8"})


# ---- patch / unpatch ----------------------------------------------------------------------
@dataclass
class RopePatch:
    """Handle returned by :func:`patch_rope`; ``undo()`` (or :func:`unpatch_rope`) restores HF's path."""

    rotary_modules: list[nn.Module] = field(default_factory=list)
    attention_modules: list[nn.Module] = field(default_factory=list)

    def undo(self) -> None:
        for m in self.attention_modules:
            for attr in ("forward", "_hf_fp8_rope", "_hf_fp8_family"):
                m.__dict__.pop(attr, None)
        for m in self.rotary_modules:
            for attr in ("forward", "_apply", "_hf_fp8_rope"):
                m.__dict__.pop(attr, None)
        self.rotary_modules.clear()
        self.attention_modules.clear()

    @property
    def active(self) -> bool:
        return bool(self.rotary_modules or self.attention_modules)


def _is_rotary(m: nn.Module) -> bool:
    return (
        isinstance(getattr(m, "inv_freq", None), torch.Tensor) and hasattr(m, "config") and "Rotary" in type(m).__name__
    )


def _attention_classes(model: nn.Module) -> tuple[str, ...]:
    family = family_of(model)
    return (family.attention,) if family is not None else ()


def patch_rope(model: nn.Module) -> RopePatch:
    """Rotate q/k in FP32 in every attention layer of an HF model of a supported family (Llama,
    Mistral, Qwen2, Qwen3), and pin RoPE buffers to FP32.

    Idempotent. Raises ``ValueError`` for model families it does not know (the table in
    :mod:`hf_fp8.integrations.families`), rather than silently leaving BF16 RoPE in place.

    Example:
        ```python
        >>> import hf_fp8, torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        ...                   num_key_value_heads=2, vocab_size=128, rope_theta=500000.0)
        >>> model = LlamaForCausalLM(cfg)
        >>> patch = hf_fp8.patch_rope(model)
        >>> model.to(torch.bfloat16).model.rotary_emb.inv_freq.dtype
        torch.float32
        >>> patch.undo()

        ```
    """
    existing = getattr(model, "_hf_fp8_rope_patch", None)
    if isinstance(existing, RopePatch) and existing.active:
        return existing
    family = family_of(model)
    if family is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"hf_fp8.patch_rope: model_type {model_type!r} is not supported (supported: {supported_model_types()})"
        )
    patch = RopePatch()
    _build_dynamic_update()
    for m in model.modules():
        if _is_rotary(m):
            fp32 = _fp32_inv_freq(m)
            m.inv_freq = fp32
            if isinstance(getattr(m, "original_inv_freq", None), torch.Tensor):
                m.original_inv_freq = fp32.clone()
            m.forward = bind(_rotary_forward, m)
            m._apply = bind(_keep_fp32_apply, m)
            patch.rotary_modules.append(m)
        elif type(m).__name__ == family.attention:
            if family.qk_norm and not (hasattr(m, "q_norm") and hasattr(m, "k_norm")):
                patch.undo()
                raise ValueError(
                    f"hf_fp8.patch_rope: {type(m).__name__} has no q_norm/k_norm, which {family.prefix} has"
                )
            m.forward = bind(_attention_forward, m)
            m._hf_fp8_family = family
            patch.attention_modules.append(m)
    if not patch.rotary_modules or not patch.attention_modules:
        patch.undo()
        raise ValueError("hf_fp8.patch_rope: found no rotary embedding or no attention layers to patch")
    model._hf_fp8_rope_patch = patch
    return patch


def unpatch_rope(model: nn.Module) -> None:
    patch = getattr(model, "_hf_fp8_rope_patch", None)
    if isinstance(patch, RopePatch):
        patch.undo()
    model.__dict__.pop("_hf_fp8_rope_patch", None)
