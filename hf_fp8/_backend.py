"""Which implementation runs: the real FP8 GEMM and Triton kernels, or the exact emulation.

The decision is per tensor and needs no global state except an explicit override, which
tests use to run the Triton kernels under the CPU interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Literal

import torch

__all__ = ["fp8_gemm_supported", "use_triton", "use_triton_kernels", "kernel_backend"]

KernelBackend = Literal["auto", "triton", "torch"]
_override: KernelBackend = "auto"


@functools.lru_cache(maxsize=16)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_gemm_supported(device: torch.device) -> bool:
    """True on CUDA GPUs with compute capability >= 8.9 (Ada, Hopper, Blackwell): ``torch._scaled_mm`` runs there."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_capability(index) >= (8, 9)


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    from hf_fp8.kernels import is_triton_available

    return is_triton_available()


def use_triton(x: torch.Tensor) -> bool:
    """Triton kernels that need no FP8 hardware (RoPE, norms, SwiGLU, AdamW) on any CUDA GPU, torch
    references elsewhere (unless overridden)."""
    if _override != "auto":
        return _override == "triton"
    return x.is_cuda and _triton_available()


def use_triton_kernels(x: torch.Tensor) -> bool:
    """Triton quantization kernels on FP8-capable GPUs, torch references elsewhere (unless overridden)."""
    if _override == "triton":
        return True
    if _override == "torch":
        return False
    return fp8_gemm_supported(x.device) and _triton_available()


@contextlib.contextmanager
def kernel_backend(backend: KernelBackend) -> Iterator[None]:
    """Force the quantization backend inside the block: ``"triton"``, ``"torch"`` or ``"auto"``.

    ``"triton"`` on a CPU needs ``TRITON_INTERPRET=1`` set before triton is imported.
    """
    global _override
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"kernel_backend: got {backend!r}; allowed values are 'auto', 'triton', 'torch'")
    previous, _override = _override, backend
    try:
        yield
    finally:
        _override = previous
