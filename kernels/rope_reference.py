"""Pure-torch FP32 reference for :mod:`hf_fp8.kernels.rope` (and the CPU path).

Same math as the kernel: the model's FP32 angle, cos/sin and the rotation in FP32, one
rounding to the input dtype. Differs from the kernel only by the cos/sin implementation
(torch's vs the kernel's reduced-argument ``tl.cos``), i.e. by about 1 ulp of FP32.
"""

from __future__ import annotations

import torch

__all__ = ["rope_reference", "rope_angles"]


def _check_rope_inputs(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected (batch, seq, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{name}: expected float32, bfloat16 or float16, got {t.dtype}")
    B, S, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != S or k.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, seq and head_dim")
    if D % 2:
        raise ValueError(f"head_dim must be even, got {D}")
    if inv_freq.dtype != torch.float32 or inv_freq.shape != (D // 2,):
        raise ValueError(
            f"inv_freq: expected float32 of shape ({D // 2},), got {inv_freq.dtype} {tuple(inv_freq.shape)}; "
            "a BF16 inv_freq has already lost the precision FP32 RoPE is for (hf_fp8.patch_rope recomputes it)"
        )
    if position_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"position_ids: expected an integer tensor, got {position_ids.dtype}")
    ps = position_ids.shape if position_ids.dim() == 2 else (1, *position_ids.shape)
    if ps[-1] != S or ps[0] not in (1, B):
        raise ValueError(f"position_ids: expected shape ({B}, {S}) or (1, {S}), got {tuple(position_ids.shape)}")


def rope_angles(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """(B|1, S, D/2) FP32 angles: fp32(pos) * inv_freq, rounded to FP32 as HF does."""
    pos = position_ids if position_ids.dim() == 2 else position_ids.view(1, -1)
    return pos.to(torch.float32)[..., None] * inv_freq.to(torch.float32)


def rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    scaling: float = 1.0,
    *,
    backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP32 rotation of q (B, S, Hq, D) and k (B, S, Hk, D); ``backward`` applies the inverse rotation."""
    _check_rope_inputs(q, k, position_ids, inv_freq)
    angle = rope_angles(position_ids, inv_freq)[:, :, None, :]  # (B|1, S, 1, D/2)
    c = torch.cos(angle) * scaling
    s = torch.sin(angle) * scaling
    if backward:
        s = -s

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)
