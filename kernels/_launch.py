"""Launching Triton kernels without the JIT's per-launch argument binding.

``kernel[grid](*args, **constexprs)`` binds and specializes every argument in Python before
each launch: 20-40 us of host time per launch of our 30-argument cast kernel on the lent
H100's host (``benchmarks/results/history/host_h100.json``, each piece with and without this module:
a one-launch re-cast 62 vs 81 us, a two-launch tensorwise cast 76 vs 112 us). An FP8 layer
launches 6 to 9 such kernels per training step, a large part of why its host time was ~1.9 ms
against 0.23 ms for ``nn.Linear``, and why a model with small FP8 layers left the GPU waiting
for the host.

:func:`launch` keeps what the JIT returned for each *specialization* and afterwards calls its
launcher directly. The key holds everything the JIT specializes on (triton 3.6): each tensor's
dtype and 16-byte alignment, each integer's ``== 1`` / divisibility by 16 / 32-bit range, the
constexpr values and launch options, and the device; anything else the key does not recognise
takes the JIT path. The first launch of each specialization, any launch under the interpreter,
with launch hooks registered (profilers), or with another triton version goes through the JIT
as before, so this changes host time only, never which compiled kernel runs.
``HF_FP8_FAST_LAUNCH=0`` turns it off.
"""

from __future__ import annotations

import os

import torch
import triton

__all__ = ["cdiv", "interpreting", "launch", "next_power_of_2"]

_I32 = (-(2**31), 2**31 - 1)
_ENABLED = os.environ.get("HF_FP8_FAST_LAUNCH", "1") != "0" and triton.__version__.startswith("3.6.")
_COMPILED: dict[tuple, object] = {}


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host code: triton's is a constexpr function whose Python call
    unwraps its arguments, ~2 us per call (~300 calls per forward of an 8-layer FP8 Llama)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for host code (see :func:`cdiv`); 1 for n <= 1."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


_INTERPRETING: list[bool] = []


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``), read once:
    triton decides it when its kernels are decorated, so it cannot change within a process."""
    if not _INTERPRETING:
        _INTERPRETING.append(os.environ.get("TRITON_INTERPRET", "0") == "1")
    return _INTERPRETING[0]


def _tensor_spec(a: torch.Tensor) -> object:
    return (a.dtype, not a.data_ptr() & 15)


def _int_spec(a: int) -> object:
    return (a == 1, not a & 15, _I32[0] <= a <= _I32[1])


_SPEC_BY_TYPE = {
    torch.Tensor: _tensor_spec,
    torch.nn.Parameter: _tensor_spec,
    bool: lambda a: ("b", a),
    int: _int_spec,
    float: lambda a: "f",
}


_INT_SPECS: dict[int, tuple] = {}  # the few distinct sizes and strides a model launches with


def _int_spec_cached(a: int) -> object:
    spec = _INT_SPECS.get(a)
    if spec is None:
        if len(_INT_SPECS) >= 4096:
            _INT_SPECS.clear()
        spec = _INT_SPECS[a] = _int_spec(a)
    return spec


def _key_of_args(args: tuple) -> tuple:
    """``tuple(_spec(a) for a in args)`` with the two common types inlined (a loop of ~20
    arguments per launch: its host time is part of every launch's)."""
    out = []
    for a in args:
        t = type(a)
        if t is torch.Tensor or t is torch.nn.Parameter:
            out.append((a.dtype, not a.data_ptr() & 15))
        elif t is int:
            out.append(_int_spec_cached(a))
        else:
            out.append(_spec(a))
    return tuple(out)


def _spec(a) -> object:
    """What the JIT specializes on for one argument (more is harmless: only more cache entries).
    Types not listed (tensor subclasses included) raise ``TypeError``: the JIT decides then."""
    try:
        return _SPEC_BY_TYPE[type(a)](a)
    except KeyError:
        raise TypeError(type(a).__name__) from None


_RUNTIME: list = []  # (triton knobs.runtime, get_current_device, get_current_stream), resolved once


def _runtime() -> tuple:
    if not _RUNTIME:
        from triton import knobs
        from triton.runtime.driver import driver

        _RUNTIME.append((knobs.runtime, driver.active.get_current_device, driver.active.get_current_stream))
    return _RUNTIME[0]


def _hooks_registered(runtime) -> bool:
    hooks = (runtime.launch_enter_hook, runtime.launch_exit_hook)
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


def launch(kernel, grid: tuple[int, ...], args: tuple, constexprs: dict, num_warps: int) -> None:
    """``kernel[grid](*args, **constexprs, num_warps=num_warps)``, through the cached compiled kernel
    when one exists for this specialization. ``args``: every non-constexpr argument, positionally,
    in the kernel's order; ``constexprs``: every constexpr argument, by name."""
    first = args[0]
    if not (_ENABLED and isinstance(first, torch.Tensor) and first.is_cuda):
        kernel[grid](*args, **constexprs, num_warps=num_warps)
        return
    runtime, current_device, current_stream = _runtime()
    if _hooks_registered(runtime):
        kernel[grid](*args, **constexprs, num_warps=num_warps)
        return
    device = current_device()  # what the JIT keys its caches and picks its stream by
    try:
        key = (id(kernel), device, num_warps, tuple(constexprs.items()), _key_of_args(args))
    except TypeError:
        kernel[grid](*args, **constexprs, num_warps=num_warps)
        return
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = kernel[grid](*args, **constexprs, num_warps=num_warps)
        names = kernel.arg_names
        if len(args) + len(constexprs) == len(names) and all(n in constexprs for n in names[len(args) :]):
            tail = tuple(constexprs[n] for n in names[len(args) :])
            if all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
                _COMPILED[key] = (compiled, tail)
        return
    compiled, tail = compiled
    stream = current_stream(device)
    g = (*grid, 1, 1)
    compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)
