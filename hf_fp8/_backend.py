"""Which implementation runs: the real FP8 GEMM and Triton kernels, or the exact emulation.

The decision is per tensor and needs no global state except an explicit override, which
tests use to run the Triton kernels under the CPU interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Literal

import torch

__all__ = ["fp8_gemm_supported", "use_triton", "use_triton_kernels", "kernel_backend"]

KernelBackend = Literal["auto", "triton", "torch"]
_override: KernelBackend = "auto"


def compile_time_constant(fn):
    """What ``torch.compiler.assume_constant_result`` does (torch.compile calls ``fn`` at trace time
    and bakes in its result), without importing ``torch._dynamo`` when hf_fp8 is imported: that
    import is slow, and with it gloo process groups hung at teardown in our 2-process CPU tests."""
    fn._dynamo_marked_constant = True
    return fn


# Facts of the process, cached by hand and marked constant for torch.compile: torch 2.11's
# dynamo traced through an lru_cache wrapper into importlib's find_spec and broke the graph in
# every layer.
_FP8_CAPABLE: dict[int, bool] = {}
_TRITON: list[bool] = []


@compile_time_constant
def _fp8_capable(index: int) -> bool:
    """Compute capability >= 8.9 for CUDA device ``index`` (-1: the current device). A bool, not
    the capability tuple: dynamo 2.11 failed comparing a constant tuple while tracing."""
    if index not in _FP8_CAPABLE:
        resolved = torch.cuda.current_device() if index < 0 else index
        _FP8_CAPABLE[index] = torch.cuda.get_device_capability(resolved) >= (8, 9)
    return _FP8_CAPABLE[index]


def fp8_gemm_supported(device: torch.device) -> bool:
    """True on CUDA GPUs with compute capability >= 8.9 (Ada, Hopper, Blackwell): ``torch._scaled_mm`` runs there."""
    if device.type != "cuda":
        return False
    return _fp8_capable(device.index if device.index is not None else -1)


@compile_time_constant
def _triton_available() -> bool:
    if not _TRITON:
        # triton ships with CUDA builds of torch; CPU builds need `pip install triton` (the torch references run otherwise)
        _TRITON.append(importlib.util.find_spec("triton") is not None)
    return _TRITON[0]


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
