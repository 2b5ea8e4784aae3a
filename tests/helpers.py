"""Shared test helpers: error metrics with informative failures, bit-exact FP8 comparison."""

from __future__ import annotations

import math

import torch


def sqnr_db(ref: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's measure for FP8 numerics)."""
    ref = ref.double()
    ref, actual = ref.detach(), actual.detach()
    noise = (ref - actual.double()).norm()
    if noise == 0:
        return math.inf
    return float(20 * torch.log10(ref.norm() / noise))


def rel_err(ref: torch.Tensor, actual: torch.Tensor) -> float:
    ref = ref.double()
    return float((ref.detach() - actual.detach().double()).norm() / ref.detach().norm())


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-exact comparison (FP8 has no ==); on failure, print the first differing elements."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.contiguous().view(torch.uint8) if actual.element_size() == 1 else actual.contiguous().view(torch.int32)
    e = (
        expected.contiguous().view(torch.uint8)
        if expected.element_size() == 1
        else expected.contiguous().view(torch.int32)
    )
    diff = (a != e).nonzero()
    if len(diff):
        idx = [tuple(i.tolist()) for i in diff[:5]]
        detail = ", ".join(f"{i}: {actual[i].float().item()} vs {expected[i].float().item()}" for i in idx)
        raise AssertionError(f"{what}: {len(diff)} of {a.numel()} elements differ, e.g. {detail}")


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, what: str = ""):
    """allclose that says where and by how much it failed."""
    a, e = actual.double(), expected.double()
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol)
    if bad.any():
        worst = ((a - e).abs() - rtol * e.abs()).argmax()
        i = tuple(int(v) for v in torch.unravel_index(worst, a.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements beyond rtol={rtol}, atol={atol}; "
            f"worst at {i}: {a[i].item()} vs {e[i].item()}"
        )
