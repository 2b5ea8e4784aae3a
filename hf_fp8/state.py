"""FP8 training state (delayed-scaling histories and scales) apart from the model's weights.

A converted model's ``save_pretrained`` writes a stock HF checkpoint, so this state is not in
it; Trainer checkpoints store it beside the weights in ``hf_fp8_state.safetensors`` and
restore it on resume, so a resumed run continues with the same scales.

A resume that cannot restore it never goes on silently: the file missing (deleted, or never
written), unreadable, matching none or only some of the model's layers, or saved with another
history length, is a :class:`Fp8StateWarning` naming the file and the layers whose state starts
afresh (they measure new amaxes from the next step, so the run is no longer bit-exact with an
uninterrupted one), or, with ``strict=True`` (the Trainer's ``--fp8_strict_resume``), a
:class:`Fp8StateError`.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from hf_fp8.linear import Fp8Linear

__all__ = [
    "FP8_STATE_FILE",
    "Fp8StateError",
    "Fp8StateWarning",
    "fp8_state_dict",
    "load_fp8_state",
    "load_fp8_state_dict",
    "save_fp8_state",
]

FP8_STATE_FILE = "hf_fp8_state.safetensors"
_BUFFERS = ("fp8_amax_history", "fp8_scale")


class Fp8StateWarning(UserWarning):
    """FP8 state could not be restored (fully) on resume; the affected layers start afresh."""


class Fp8StateError(RuntimeError):
    """FP8 state could not be restored and ``strict`` resume was asked for."""


def _fp8_modules(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, Fp8Linear) and m._fp8_delayed is not None:
            yield name, m


def fp8_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.fp8_amax_history": ..., "<module>.fp8_scale": ...}`` for every delayed-scaling layer."""
    return {f"{name}.{b}": getattr(m, b).detach().clone() for name, m in _fp8_modules(model) for b in _BUFFERS}


def _problem(message: str, strict: bool) -> None:
    if strict:
        raise Fp8StateError(message)
    warnings.warn(message, Fp8StateWarning, stacklevel=3)


def load_fp8_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = False, source: str = "the FP8 state"
) -> int:
    """Restore what :func:`fp8_state_dict` saved; returns how many layers were restored.

    Every delayed-scaling layer of ``model`` is expected in ``state``: a layer it lacks, or whose
    history has another length (``amax_history_len`` changed), keeps its fresh state, with a
    :class:`Fp8StateWarning` (``strict``: :class:`Fp8StateError`, nothing restored). Non-finite
    amaxes in a history (a step whose tensors held inf/NaN) are restored as 0, which the scale
    update ignores, with a warning; a non-finite scale is recomputed from the history."""
    layers = list(_fp8_modules(model))
    missing, mismatched, plan = [], [], []
    for name, m in layers:
        keys = [f"{name}.{b}" for b in _BUFFERS]
        if not all(k in state for k in keys):
            missing.append(name)
            continue
        history, scale = state[keys[0]], state[keys[1]]
        if tuple(history.shape) != tuple(m.fp8_amax_history.shape) or tuple(scale.shape) != tuple(m.fp8_scale.shape):
            mismatched.append(f"{name} (saved history {tuple(history.shape)}, model {tuple(m.fp8_amax_history.shape)})")
            continue
        plan.append((name, m, history, scale))
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(layers)} delayed-scaling layers are not in it (e.g. {missing[:3]})")
        if mismatched:
            parts.append(
                f"{len(mismatched)} have another amax history length (Fp8Config.amax_history_len changed?), e.g. "
                f"{mismatched[:2]}"
            )
        unused = len(state) - 2 * len(plan)
        if unused:
            parts.append(f"{unused} of its {len(state)} tensors match no layer of this model")
        if strict:
            raise Fp8StateError(f"{source}: {'; '.join(parts)}. Nothing was restored.")
        _problem(
            f"{source}: {'; '.join(parts)}. Those layers start with fresh amax histories and scales "
            f"(re-measured from the next step); the other {len(plan)} are restored.",
            strict,
        )
    nonfinite = []
    for name, m, history, scale in plan:
        history = history.to(device=m.fp8_amax_history.device, dtype=torch.float32)
        bad = ~torch.isfinite(history)
        if bad.any():
            nonfinite.append(name)
            history = torch.where(bad, torch.zeros_like(history), history)
        m.fp8_amax_history.copy_(history)
        scale = scale.to(device=m.fp8_scale.device, dtype=torch.float32)
        m.fp8_scale.copy_(torch.where(torch.isfinite(scale) & (scale > 0), scale, m.fp8_scale))
        m._fp8_delayed.seed_from_history()
    if nonfinite:
        warnings.warn(
            f"{source}: {len(nonfinite)} layers' amax histories hold inf/NaN (a step with non-finite tensors before "
            f"the save), e.g. {nonfinite[:3]}; those entries are restored as 0, which the scale update ignores",
            Fp8StateWarning,
            stacklevel=2,
        )
    return len(plan)


def save_fp8_state(model: nn.Module, directory: str | os.PathLike) -> str | None:
    """Write the model's FP8 state to ``directory/hf_fp8_state.safetensors`` (atomically: a
    temporary file renamed into place). Returns the path, or ``None`` when the model has no
    delayed-scaling layer (nothing to save)."""
    from safetensors.torch import save_file

    state = fp8_state_dict(model)
    if not state:
        return None
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, FP8_STATE_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, tmp)
    os.replace(tmp, path)
    return path


def load_fp8_state(model: nn.Module, directory: str | os.PathLike, *, strict: bool = False) -> int:
    """Restore the FP8 state saved in the checkpoint ``directory``; returns how many layers.

    A model without delayed-scaling layers needs nothing (returns 0). Otherwise a missing or
    unreadable file is a :class:`Fp8StateWarning` (``strict``: :class:`Fp8StateError`) saying
    which file and how many layers start afresh; see :func:`load_fp8_state_dict` for the rest."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    layers = sum(1 for _ in _fp8_modules(model))
    if not layers:
        return 0
    path = os.path.join(directory, FP8_STATE_FILE)
    if not os.path.isfile(path):
        _problem(
            f"{path} is missing (deleted, or the process stopped before writing it): the amax histories and scales of "
            f"{layers} delayed-scaling layers start afresh (re-measured from the next step), so this run is not "
            "bit-exact with an uninterrupted one. --fp8_strict_resume (strict=True) makes this an error.",
            strict,
        )
        return 0
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        _problem(
            f"{path} cannot be read ({e}): the amax histories and scales of {layers} delayed-scaling layers start "
            "afresh (re-measured from the next step).",
            strict,
        )
        return 0
    return load_fp8_state_dict(model, state, strict=strict, source=path)
