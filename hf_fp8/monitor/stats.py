"""On-device statistics of a linear layer's input, as that layer's FP8 E4M3 cast sees it.

For an input ``X`` of shape ``(*, K)`` (``M`` tokens of ``K`` features), cast to E4M3 as
``X * s`` with a per-tensor or per-token scale ``s``:

- **kurtosis** (the FOG paper's outlier measure): per token, ``mean(x⁴) / mean(x²)²`` along the
  hidden dimension, then the mean over tokens. 3 for Gaussian features, 1.8 for uniform ones,
  and ``K`` (its maximum) when one feature holds all of a token's energy. Tokens whose features
  are all zero (or not finite) have no kurtosis and are left out of the mean.
- **amax**: ``max |x|``.
- **saturated**: the fraction of values with ``|x s| > 448``, E4M3's largest finite value; the
  cast clamps them. Dynamic scales (tensorwise, rowwise) come from the current amax, so nothing
  saturates by construction (``amax * (448 / amax)`` may round one FP32 ulp above 448, which
  the cast turns into 448 all the same: it is not counted); a delayed scale comes from past
  amaxes and saturates when the amax grows faster than its history.
- **underflow**: the fraction of values that are nonzero but have ``|x s| <= 2⁻¹⁰``: half of
  E4M3's smallest subnormal ``2⁻⁹``, so round-to-nearest-even casts them to zero (``2⁻¹⁰`` itself
  is a tie, which rounds to the even neighbour, zero).
- **scale**: ``s``; for rowwise, the smallest per-token scale (that of the token holding the amax).

Everything stays on the input's device (no host synchronization): :func:`input_stats` returns
one small FP64 tensor that the caller copies to the host once per logging event.

The arithmetic is FP32 on rows normalized by their own amax, ``y = x / amax_row`` in
``[-1, 1]``: kurtosis does not change under a per-row scaling, and the normalization keeps
``x⁴`` from overflowing FP32 for large activations (``|x| >~ 2²⁸`` with K = 16384) or
underflowing for tiny ones. The FP8 thresholds move to the normalized domain with the same
factor, ``|x s| = |y| * (amax_row * s)``.
"""

from __future__ import annotations

import torch

from hf_fp8.config import Recipe
from hf_fp8.quantize import amax_to_scale

__all__ = ["E4M3_FLUSH", "E4M3_MAX", "STAT_NAMES", "activation_kurtosis", "input_stats"]

E4M3_MAX = 448.0
E4M3_FLUSH = 2.0**-10  # half the smallest E4M3 subnormal (2**-9): |x s| <= this rounds to zero
# The order of :func:`input_stats`' output.
STAT_NAMES = ("kurtosis_sum", "tokens", "amax", "saturated", "underflow", "scale")
# Bound on the FP32 temporaries of one pass (256 MiB): larger inputs are processed in row chunks.
_CHUNK_ELEMENTS = 1 << 26


def input_stats(
    x: torch.Tensor,
    *,
    recipe: Recipe | str = Recipe.TENSORWISE,
    scale: torch.Tensor | None = None,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> torch.Tensor:
    """FP8 health statistics of one linear-layer input, computed on its device with no host sync.

    Args:
        x (`torch.Tensor` of shape `(*, K)`, FP32, BF16 or FP16):
            The input; not modified.
        recipe (`Recipe` or `str`, *optional*, defaults to `"tensorwise"`):
            The scale the E4M3 cast uses: ``"tensorwise"`` (``448 / amax``), ``"rowwise"``
            (``448 / amax_row`` per token) or ``"delayed"`` (``scale``).
        scale (`torch.Tensor` of shape `()`, *optional*):
            The delayed recipe's scale for this input (``Fp8Linear.fp8_scale[0]``); required
            for ``"delayed"`` and ignored otherwise.
        chunk_elements (`int`, *optional*, defaults to `2**26`):
            Process at most this many elements per pass (bounds the FP32 temporaries).

    Returns:
        `torch.Tensor` of shape `(6,)`, FP64, on ``x``'s device, in the order of ``STAT_NAMES``:
        sum over tokens of the per-token kurtosis, number of tokens in that sum, amax, number of
        saturated values, number of flushed-to-zero values, scale. Sums and counts (not means)
        so that several calls in one step add up; divide by the token and element counts.

    Example:
        ```python
        >>> import torch
        >>> from hf_fp8.monitor.stats import STAT_NAMES, input_stats
        >>> x = torch.zeros(2, 64)
        >>> x[:, 0] = 1.0  # all of each token's energy in one feature: kurtosis = K
        >>> dict(zip(STAT_NAMES, input_stats(x).tolist()))["kurtosis_sum"] / 2
        64.0

        ```
    """
    recipe = Recipe.parse("recipe", recipe)
    if not x.is_floating_point():
        raise TypeError(f"input_stats: expected a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(
            f"input_stats: expected a non-empty tensor with a feature dimension, got shape {tuple(x.shape)}"
        )
    x2d = x.detach().reshape(-1, x.shape[-1])
    M, K = x2d.shape
    # max |x| per token in the input's dtype (exact: it is one of the values), with no FP32 copy of x
    row_amax = torch.linalg.vector_norm(x2d, float("inf"), dim=-1).float()  # (M,)
    amax = row_amax.max()
    valid = (row_amax > 0) & torch.isfinite(row_amax)
    safe_amax = torch.where(valid, row_amax, torch.ones_like(row_amax))

    if recipe is Recipe.DELAYED:
        if scale is None:
            raise ValueError("input_stats: recipe 'delayed' needs the layer's scale (Fp8Linear.fp8_scale[0])")
        report_scale = scale.detach().float().reshape(())
        row_scale = report_scale
    else:
        report_scale = amax_to_scale(amax, E4M3_MAX)
        row_scale = amax_to_scale(row_amax, E4M3_MAX) if recipe is Recipe.ROWWISE else report_scale
    # |x s| = |y| * gain, with y = x / amax_row the normalized row
    gain = safe_amax * row_scale
    flush_at = (E4M3_FLUSH / gain)[:, None]
    saturate_above = (E4M3_MAX / gain)[:, None]

    rows = max(1, chunk_elements // K)
    parts = []
    for start in range(0, M, rows):
        sl = slice(start, start + rows)
        y = x2d[sl] / safe_amax[sl, None]  # FP32 (type promotion), |y| <= 1
        n2 = torch.linalg.vector_norm(y, 2, dim=-1)
        n4 = torch.linalg.vector_norm(y, 4, dim=-1)
        # mean(y^4) / mean(y^2)^2 = K * (||y||_4 / ||y||_2)^4; n2 >= 1 on valid rows (their max is 1)
        kurt = K * (n4 / torch.where(valid[sl], n2, torch.ones_like(n2))) ** 4
        kurt_sum = torch.where(valid[sl], kurt, torch.zeros_like(kurt)).sum(dtype=torch.float64)
        y = y.abs_()
        zeros = torch.count_nonzero(y == 0)
        underflow = torch.count_nonzero(y <= flush_at[sl]) - zeros
        if recipe is Recipe.DELAYED:
            saturated = torch.count_nonzero(y > saturate_above[sl])
        else:
            saturated = torch.zeros_like(zeros)  # dynamic scales map amax to 448: nothing saturates
        parts.append(torch.stack([kurt_sum, saturated, underflow]))  # FP64 by type promotion
    kurt_sum, saturated, underflow = (parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)).unbind()
    return torch.stack([kurt_sum, valid.sum(), amax, saturated, underflow, report_scale])


def activation_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """The mean over tokens of ``mean(x⁴) / mean(x²)²`` along the last dimension (FP64, 0-dim, on ``x``'s device).

    Example:
        ```python
        >>> import torch
        >>> from hf_fp8.monitor.stats import activation_kurtosis
        >>> round(float(activation_kurtosis(torch.randn(4096, 1024, generator=torch.Generator().manual_seed(0)))), 1)
        3.0

        ```
    """
    s = input_stats(x)
    return s[0] / s[1].clamp_min(1)
