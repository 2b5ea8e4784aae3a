"""Shared test helpers: error metrics with informative failures, bit-exact FP8 comparison."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]


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
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    a = actual.contiguous().view(as_int[actual.element_size()])
    e = expected.contiguous().view(as_int[expected.element_size()])
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


def check_o_proj_keeps_attention_output(device: str, recipe: str) -> None:
    """With SDPA (flash-style kernels, on CUDA and on the CPU), o_proj's kept input is the storage
    SDPA keeps for its own backward: the model saves one FP8 (tokens x hidden) copy less than with
    the switch off (unique storages counted), and the loss and every gradient are bit-identical."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_fp8
    from hf_fp8.integrations import rope as hf_rope

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=512, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    hf_fp8.convert(base, hf_fp8.Fp8Config(recipe=recipe, auto_filter=False, exclude=("lm_head",)))
    ids = torch.randint(0, 512, (2, 256), device=device)
    results = {}
    try:
        for recast in (True, False):
            hf_rope.RECAST_OPROJ_INPUT = recast
            model = copy.deepcopy(base)
            storages = {}

            def pack(t, storages=storages):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            results[recast] = (sum(storages.values()), loss.detach(), grads)
    finally:
        hf_rope.RECAST_OPROJ_INPUT = True
    (saved_on, loss_on, grads_on), (saved_off, loss_off, grads_off) = results[True], results[False]
    assert saved_off - saved_on >= 2 * 256 * 512  # at least o_proj's FP8 copy of (tokens x hidden)
    assert_bits_equal(loss_on, loss_off, "loss")
    for a, b in zip(grads_on, grads_off):
        assert_bits_equal(a, b, "gradient")


def import_benchmark(name: str) -> ModuleType:
    """``benchmarks.<name>`` from this checkout, found by its path.

    The benchmarks run from the repo root (``python -m benchmarks.<name>``), where the root is on
    ``sys.path``; plain ``pytest`` does not put it there, and tests must not depend on it. The
    ``benchmarks`` package is loaded from ``ROOT / "benchmarks"`` once, so the scripts' own
    ``from benchmarks.<other> import ...`` lines resolve to the same folder."""
    folder = ROOT / "benchmarks"
    package = sys.modules.get("benchmarks")
    if package is None:
        spec = importlib.util.spec_from_file_location(
            "benchmarks", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = package
        spec.loader.exec_module(package)
    elif [Path(p).resolve() for p in package.__path__] != [folder]:
        raise ImportError(f"a module named 'benchmarks' from {list(package.__path__)} is loaded, not {folder}")
    return importlib.import_module(f"benchmarks.{name}")
