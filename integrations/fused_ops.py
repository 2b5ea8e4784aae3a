"""Fused RMSNorm and SwiGLU for HF Llama models: per-instance forwards, reversible.

``patch_fused_ops(model)`` gives every ``LlamaRMSNorm`` a forward that runs
:func:`hf_fp8.kernels.norm_swiglu.rms_norm` and every ``LlamaMLP`` (SiLU activation) a forward
that runs ``down_proj(swiglu(gate_proj(x), up_proj(x)))`` (gate and up as one FP8 node
sharing the input's quantization when both are ``Fp8Linear``, see
:func:`hf_fp8.linear.shared_input_linears`; with all three FP8, one node whose SwiGLU runs
inside down's FP8 cast, see :mod:`hf_fp8.mlp_ops`); on CPUs (or without Triton) the
same functions run as torch (the references). Nothing outside the model changes, and
``unpatch_fused_ops`` restores HF's forwards. Model families are listed in one table.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from hf_fp8._backend import use_triton
from hf_fp8.linear import shared_input_linears
from hf_fp8.mlp_ops import fused_swiglu_mlp, fused_swiglu_mlp_applies

__all__ = ["patch_fused_ops", "unpatch_fused_ops"]

_CLASSES = {"llama": {"norm": ("LlamaRMSNorm",), "mlp": ("LlamaMLP",)}}
_MARK = "_hf_fp8_fused"


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if use_triton(hidden_states):
        from hf_fp8.kernels.norm_swiglu import rms_norm

        return rms_norm(hidden_states, self.weight, self.variance_epsilon)
    from hf_fp8.kernels.norm_swiglu_reference import rms_norm_reference

    return rms_norm_reference(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if fused_swiglu_mlp_applies(self.gate_proj, self.up_proj, self.down_proj, x):
        return fused_swiglu_mlp(self.gate_proj, self.up_proj, self.down_proj, x)
    gate, up = shared_input_linears((self.gate_proj, self.up_proj), x)
    if use_triton(gate):
        from hf_fp8.kernels.norm_swiglu import swiglu

        return self.down_proj(swiglu(gate, up))
    from hf_fp8.kernels.norm_swiglu_reference import swiglu_reference

    return self.down_proj(swiglu_reference(gate, up))


def _is_silu(mlp: nn.Module) -> bool:
    act = getattr(mlp, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")


def patch_fused_ops(model: nn.Module) -> int:
    """Fuse RMSNorm and SwiGLU in an HF Llama model; returns the number of modules patched.

    Idempotent; MLPs with another activation than SiLU are left alone.
    """
    table = _CLASSES.get(getattr(getattr(model, "config", None), "model_type", None))
    if table is None:
        return 0
    n = 0
    for m in model.modules():
        name = type(m).__name__
        if getattr(m, _MARK, False):
            continue
        if name in table["norm"] and hasattr(m, "variance_epsilon"):
            m.forward = types.MethodType(_norm_forward, m)
        elif name in table["mlp"] and _is_silu(m):
            m.forward = types.MethodType(_mlp_forward, m)
        else:
            continue
        setattr(m, _MARK, True)
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
