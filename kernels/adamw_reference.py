"""The AdamW kernel's random bits in torch, without triton: the CPU path of
:class:`hf_fp8.optim.AdamW` draws exactly the bits the kernel (:mod:`.adamw`) draws, and must
run where triton is not installed.

One bit pattern per element: a 32-bit integer hash ("lowbias32") of the element's index
under a per-step key derived from the step's seed. The weight takes the low 16 bits and
``exp_avg`` the high 16 of one hash; ``exp_avg_sq`` the low 16 of a hash under a second key.
"""

from __future__ import annotations

import torch

__all__ = ["random_bits", "random_keys"]

_M32 = 0xFFFFFFFF


def _hash32_torch(x: torch.Tensor) -> torch.Tensor:
    """The kernel's ``_hash32`` on int64 tensors holding uint32 values (the same bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def random_keys(seed: int) -> tuple[int, int]:
    """The two uint32 keys of one step's random bits, derived from its seed."""
    keys = _hash32_torch(torch.tensor([seed & _M32, (seed ^ 0x5BD1E995) & _M32], dtype=torch.int64))
    return int(keys[0]), int(keys[1])


def random_bits(n: int, seed: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's random bits for elements ``0..n-1`` in torch (the CPU path and the tests):
    (weight bits in the low 16 and exp_avg bits in the high 16 of the first, exp_avg_sq bits in
    the low 16 of the second), as int64 tensors of uint32 values."""
    key_pm, key_v = random_keys(seed)
    i = torch.arange(n, dtype=torch.int64, device=device)
    return _hash32_torch(i ^ key_pm), _hash32_torch(i ^ key_v)
