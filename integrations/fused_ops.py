"""Fused RMSNorm and SwiGLU for HF Llama-family models: per-instance forwards, reversible.

``patch_fused_ops(model)`` gives every ``LlamaRMSNorm`` (``Qwen3RMSNorm``, ...: the family's
norm class, Qwen3's q/k norms included) a forward that runs
:func:`hf_fp8.kernels.norm_swiglu.rms_norm` and every ``LlamaMLP`` (SiLU activation) a forward
that runs ``down_proj(swiglu(gate_proj(x), up_proj(x)))`` (gate and up as one FP8 node
sharing the input's quantization when both are ``Fp8Linear``, see
:func:`hf_fp8.linear.shared_input_linears`; with all three FP8, one node whose SwiGLU runs
inside down's FP8 cast, see :mod:`hf_fp8.mlp_ops`); on CPUs (or without Triton) the
same functions run as torch (the references). Every ``LlamaDecoderLayer`` gets HF's forward
with each norm handed to the attention / MLP forward that reads its output, which runs it
inside its FP8 layers' input cast when it can (:mod:`hf_fp8.norm_ops`: the norm's output is
never written in BF16, and its backward sums the layers' input gradients and the residual's
gradient, see ``PASS_RESIDUAL``). The input embedding gets a backward that writes its weight
gradient in one pass (:mod:`hf_fp8.embedding_ops`). Nothing outside the model changes, and
``unpatch_fused_ops`` restores HF's forwards. Model families are listed in one table
(:mod:`hf_fp8.integrations.families`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from hf_fp8._backend import use_triton
from hf_fp8.embedding_ops import embedding_fusable, embedding_lookup
from hf_fp8.instance_method import bind
from hf_fp8.integrations._kv_cache import cache_arg, take_cache
from hf_fp8.integrations.families import family_of
from hf_fp8.integrations.rope import _attention_forward
from hf_fp8.linear import shared_input_linears
from hf_fp8.mlp_ops import fused_swiglu_mlp, fused_swiglu_mlp_applies
from hf_fp8.norm_ops import fused_norm_linears, norm_input_fusable

__all__ = ["patch_fused_ops", "unpatch_fused_ops"]

_MARK = "_hf_fp8_fused"
# The decoder layer takes its residuals back from the attention and MLP forwards, so that each
# residual's gradient is added inside the norm's backward kernel (no BF16 add kernel; FP32, one
# rounding). Benchmarks and tests flip this to compare with the residual adds of HF's layer.
PASS_RESIDUAL = True


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if use_triton(hidden_states):
        from hf_fp8.kernels.norm_swiglu import rms_norm

        return rms_norm(hidden_states, self.weight, self.variance_epsilon)
    from hf_fp8.kernels.norm_swiglu_reference import rms_norm_reference

    return rms_norm_reference(hidden_states, self.weight, self.variance_epsilon)


def _embedding_forward(self, input: torch.Tensor) -> torch.Tensor:
    # the input embedding: hf_fp8's one-pass weight gradient where it applies (hf_fp8.embedding_ops)
    if embedding_fusable(self, input):
        return embedding_lookup(self, input)
    return nn.Embedding.forward(self, input)


def _mlp_forward(
    self, x: torch.Tensor, _hf_fp8_norm: nn.Module | None = None, _hf_fp8_pass_input: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    # _hf_fp8_norm: x is the input of this RMSNorm, whose output the MLP reads (see _decoder_forward);
    # _hf_fp8_pass_input: return (output, x), x to be added to the output as the residual (see
    # hf_fp8.mlp_ops.fused_swiglu_mlp: its gradient then joins the norm's backward kernel)
    if fused_swiglu_mlp_applies(self.gate_proj, self.up_proj, self.down_proj, x):
        return fused_swiglu_mlp(
            self.gate_proj, self.up_proj, self.down_proj, x, norm=_hf_fp8_norm, pass_input=_hf_fp8_pass_input
        )
    residual = x
    if _hf_fp8_norm is not None and norm_input_fusable(_hf_fp8_norm, (self.gate_proj, self.up_proj), x):
        if _hf_fp8_pass_input:
            gate, up, residual = fused_norm_linears(_hf_fp8_norm, (self.gate_proj, self.up_proj), x, pass_input=True)
        else:
            gate, up = fused_norm_linears(_hf_fp8_norm, (self.gate_proj, self.up_proj), x)
    else:
        if _hf_fp8_norm is not None:
            x = _hf_fp8_norm(x)
        gate, up = shared_input_linears((self.gate_proj, self.up_proj), x)
    if use_triton(gate):
        from hf_fp8.kernels.norm_swiglu import swiglu

        out = self.down_proj(swiglu(gate, up))
    else:
        from hf_fp8.kernels.norm_swiglu_reference import swiglu_reference

        out = self.down_proj(swiglu_reference(gate, up))
    return (out, residual) if _hf_fp8_pass_input else out


def _takes_norm(module: nn.Module, forward) -> bool:
    """Whether ``module`` runs hf_fp8's ``forward`` (which accepts ``_hf_fp8_norm``)."""
    bound = module.__dict__.get("forward")
    return getattr(bound, "__func__", None) is forward


def _class_forward_checkpoints(layer: nn.Module) -> bool:
    """Whether transformers checkpoints this layer by wrapping its class's ``forward`` (transformers
    >= 5.2x: ``GradientCheckpointingLayer.__init_subclass__``), which an instance ``forward`` bypasses;
    older versions checkpoint ``__call__``, around whatever ``forward`` the instance has."""
    code = getattr(type(layer).forward, "__code__", None)
    return code is not None and code.co_name == "forward_with_checkpointing"


def _decoder_forward(
    self,
    hidden_states: torch.Tensor,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    use_cache=False,
    position_embeddings=None,
    **kwargs,
) -> torch.Tensor:
    """HF's ``LlamaDecoderLayer.forward`` (every family in the table has it), with each norm handed to the layers reading its output
    (hf_fp8's attention and MLP forwards), which run it inside their FP8 input cast when they
    can (:mod:`hf_fp8.norm_ops`) and first otherwise. Under activation checkpointing HF
    checkpoints the call of this forward, and the recompute takes the same path (its casts reuse
    the first pass's scales: :func:`hf_fp8.delayed.training_forward`)."""
    cache = take_cache(past_key_values, kwargs)  # ``cache`` since transformers 5.24
    inside = kwargs.pop("_hf_fp8_inside_checkpoint", False)
    if (
        not inside
        and self.training
        and getattr(self, "gradient_checkpointing", False)
        and torch.is_grad_enabled()
        and _class_forward_checkpoints(self)
    ):
        # newer transformers checkpoint the class's forward, which this instance forward replaces:
        # checkpoint this one the same way (hidden_states positional, for the reentrant mode)
        return self._gradient_checkpointing_func(
            functools.partial(
                _decoder_forward, self, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                position_embeddings=position_embeddings, _hf_fp8_inside_checkpoint=True, **kwargs,
            ),
            hidden_states,
        )  # fmt: skip
    residual = hidden_states
    # the attention / MLP forwards of hf_fp8 return the residual too (their input, through their
    # norm's node when fused): its gradient is then added inside the norm's backward kernel
    # rather than by an add of the two gradients (hf_fp8.norm_ops.fused_norm_linears)
    attn_kwargs = dict(
        attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
        position_embeddings=position_embeddings, **{cache_arg(type(self.self_attn).forward): cache}, **kwargs,
    )  # fmt: skip
    if _takes_norm(self.self_attn, _attention_forward):
        out = self.self_attn(
            hidden_states=hidden_states,
            _hf_fp8_norm=self.input_layernorm,
            _hf_fp8_pass_input=PASS_RESIDUAL,
            **attn_kwargs,
        )
        hidden_states = out[0]
        if PASS_RESIDUAL:
            residual = out[2]
    else:
        hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **attn_kwargs)
    hidden_states = residual + hidden_states
    residual = hidden_states
    if _takes_norm(self.mlp, _mlp_forward):
        out = self.mlp(hidden_states, _hf_fp8_norm=self.post_attention_layernorm, _hf_fp8_pass_input=PASS_RESIDUAL)
        hidden_states, residual = out if PASS_RESIDUAL else (out, residual)
    else:
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
    return residual + hidden_states


def _is_silu(mlp: nn.Module) -> bool:
    act = getattr(mlp, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")


def patch_fused_ops(model: nn.Module) -> int:
    """Fuse RMSNorm and SwiGLU in an HF model of a supported family, and give its input
    embedding hf_fp8's weight-gradient kernel; returns the number of modules patched (0 for
    a family not in :mod:`hf_fp8.integrations.families`).

    Idempotent; MLPs with another activation than SiLU are left alone.
    """
    family = family_of(model)
    if family is None:
        return 0
    n = 0
    for m in model.modules():
        name = type(m).__name__
        if getattr(m, _MARK, False):
            continue
        if name == family.norm and hasattr(m, "variance_epsilon"):
            m.forward = bind(_norm_forward, m)
        elif name == family.mlp and _is_silu(m):
            m.forward = bind(_mlp_forward, m)
        elif name == family.decoder and all(
            hasattr(m, a) for a in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
        ):
            m.forward = bind(_decoder_forward, m)
        else:
            continue
        setattr(m, _MARK, True)
        n += 1
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if type(embedding) is nn.Embedding and not getattr(embedding, _MARK, False):
        embedding.forward = bind(_embedding_forward, embedding)
        setattr(embedding, _MARK, True)
        n += 1
    return n


def unpatch_fused_ops(model: nn.Module) -> int:
    """Restore HF's forwards; returns how many modules were restored."""
    n = 0
    for m in model.modules():
        if m.__dict__.pop(_MARK, False):
            m.__dict__.pop("forward", None)
            n += 1
    return n
