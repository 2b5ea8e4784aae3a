"""Triton kernels and their pure-torch references. Depends on torch and triton only.

Installed as ``hf_fp8.kernels``. Submodules import triton; this package does not, so that
``import hf_fp8.kernels`` works where triton is missing (the references are then used).
"""

from __future__ import annotations

import importlib.util

__all__ = ["is_triton_available"]


def is_triton_available() -> bool:
    """True if triton can be imported (it ships with CUDA builds of torch; CPU builds need `pip install triton`)."""
    return importlib.util.find_spec("triton") is not None
