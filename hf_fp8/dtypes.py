"""Build models directly in a low-precision dtype."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["set_default_dtype"]


@contextlib.contextmanager
def set_default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create floating-point tensors in ``dtype`` inside the block (then restore the previous default).

    Building a model under ``torch.bfloat16`` allocates its parameters in BF16 directly, with no
    FP32 copy ever materialized (half the peak memory of building in FP32 and casting). HF's
    RoPE buffers are computed with explicit FP32 and stay FP32.

    Example:
        ```python
        >>> import torch, hf_fp8
        >>> with hf_fp8.set_default_dtype(torch.bfloat16):
        ...     layer = torch.nn.Linear(8, 8)
        >>> layer.weight.dtype, torch.get_default_dtype()
        (torch.bfloat16, torch.float32)

        ```
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"set_default_dtype: expected a floating-point torch.dtype, got {dtype!r}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
