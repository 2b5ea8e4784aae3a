"""Test set-up: Triton's CPU interpreter, with its float conversions made exact.

``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` function runs, so it is set
here, at import time of the test session (a GPU run sets ``HF_FP8_TEST_GPU=1`` to keep the
real compiler).

The interpreter (triton 3.7 to 3.9) converts floats with a bit-twiddling routine that
rounds FP8 downcasts ties-away-from-zero, drops the mantissa carry (31.9 -> 16) and does
not saturate, and truncates fp32 -> bf16. The GPU rounds to nearest even and saturates
(``cvt.rn.satfinite``). ``_exact_convert_float`` replaces that routine, in tests only, with
torch's own casts plus the GPU's saturation, so kernel outputs can be compared bit for bit
with the torch references. ``test_interpreter_patch.py`` proves the patch does its job.
"""

from __future__ import annotations

import os

if os.environ.get("HF_FP8_TEST_GPU") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest
import torch

_TL_TO_TORCH: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp64": torch.float64,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8e4nv": torch.float8_e4m3fn,
    "fp8e5": torch.float8_e5m2,
}
_UINT = {8: torch.uint8, 16: torch.uint16, 32: torch.uint32, 64: torch.uint64}


def _exact_convert_float(input, input_dtype, output_dtype, rounding_mode):  # noqa: A002 (interpreter's signature)
    src = _TL_TO_TORCH[input_dtype.name]
    dst = _TL_TO_TORCH[output_dtype.name]
    bits = np.ascontiguousarray(input).view(getattr(np, f"uint{input_dtype.primitive_bitwidth}"))
    t = torch.from_numpy(bits.copy()).view(src)
    if dst in (torch.float8_e4m3fn, torch.float8_e5m2):
        # the GPU's cvt.rn.satfinite: values beyond the largest finite (inf included) saturate
        fmax = torch.finfo(dst).max
        t = t.to(torch.float32).clamp(-fmax, fmax)
    out = t.to(dst).view(_UINT[output_dtype.primitive_bitwidth]).numpy()
    return out.reshape(np.shape(input))


_ORIGINAL_CONVERT_FLOAT = None


def _patch_interpreter() -> bool:
    global _ORIGINAL_CONVERT_FLOAT
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    _ORIGINAL_CONVERT_FLOAT = interpreter._convert_float
    interpreter._convert_float = _exact_convert_float
    return True


INTERPRETER_PATCHED = _patch_interpreter()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
