"""FP8 training state (delayed-scaling histories and scales) apart from the model's weights.

A converted model's ``save_pretrained`` writes a stock HF checkpoint, so this state is not in
it; Trainer checkpoints store it beside the weights in ``hf_fp8_state.safetensors`` and
restore it on resume, so a resumed run continues with the same scales.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from hf_fp8.linear import Fp8Linear

__all__ = ["FP8_STATE_FILE", "fp8_state_dict", "load_fp8_state_dict", "save_fp8_state", "load_fp8_state"]

FP8_STATE_FILE = "hf_fp8_state.safetensors"
_BUFFERS = ("fp8_amax_history", "fp8_scale")


def _fp8_modules(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, Fp8Linear) and m._fp8_delayed is not None:
            yield name, m


def fp8_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.fp8_amax_history": ..., "<module>.fp8_scale": ...}`` for every delayed-scaling layer."""
    return {f"{name}.{b}": getattr(m, b).detach().clone() for name, m in _fp8_modules(model) for b in _BUFFERS}


def load_fp8_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Restore what :func:`fp8_state_dict` saved; returns how many layers were restored."""
    n = 0
    for name, m in _fp8_modules(model):
        keys = [f"{name}.{b}" for b in _BUFFERS]
        if all(k in state for k in keys):
            for b, k in zip(_BUFFERS, keys, strict=True):
                getattr(m, b).copy_(state[k])
            m._fp8_delayed.seed_from_history()
            n += 1
    return n


def save_fp8_state(model: nn.Module, directory: str | os.PathLike) -> str | None:
    from safetensors.torch import save_file

    state = fp8_state_dict(model)
    if not state:
        return None
    path = os.path.join(directory, FP8_STATE_FILE)
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, path)
    return path


def load_fp8_state(model: nn.Module, directory: str | os.PathLike) -> int:
    from safetensors.torch import load_file

    path = os.path.join(directory, FP8_STATE_FILE)
    if not os.path.isfile(path):
        return 0
    return load_fp8_state_dict(model, load_file(path))
