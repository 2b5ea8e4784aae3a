"""A converted model survives ``torch.save(model)`` / ``torch.load`` and ``copy.deepcopy``: the
patched forwards come back bound to the loaded modules (not the classes' own forwards under the
same name), and the copy trains on exactly as the original does."""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
from llama_fixtures import enable_activation_checkpointing, tiny_family, train_losses

import hf_fp8
from hf_fp8.instance_method import PatchedMethod, bind


def _round_trip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _patched(model) -> dict[str, PatchedMethod]:
    return {
        f"{name}.{attr}": m.__dict__[attr]
        for name, m in model.named_modules()
        for attr in ("forward", "_apply")
        if isinstance(m.__dict__.get(attr), PatchedMethod)
    }


def _adamw_losses(model, steps: int) -> list[float]:
    return train_losses(model, torch.optim.AdamW(model.parameters(), lr=1e-3), steps, batch=2)


@pytest.mark.parametrize("copier", [_round_trip, copy.deepcopy], ids=["torch.save", "deepcopy"])
@pytest.mark.parametrize(
    "family, cfg",
    [
        ("llama", hf_fp8.Fp8Config(auto_filter=False)),
        ("qwen3", hf_fp8.Fp8Config(recipe="tensorwise", auto_filter=False)),
    ],
)
def test_converted_model_copies_keep_their_patches_and_train_the_same(family, cfg, copier):
    model = tiny_family(family)
    hf_fp8.convert(model, cfg)
    if copier is copy.deepcopy:  # (stock HF's checkpointing registers a closure hook: torch.save fails on it)
        enable_activation_checkpointing(model, use_reentrant=False)
    _adamw_losses(model, 1)  # FP8 state (delayed histories) exists
    twin = copier(model)
    patched, twin_patched = _patched(model), _patched(twin)
    # the norms, MLPs, decoder layers, embedding, rotary (forward and _apply), attention, loss
    assert len(patched) > 10 and patched.keys() == twin_patched.keys()
    for name, method in twin_patched.items():
        owner = twin.get_submodule(name.rpartition(".")[0])
        assert method.__self__ is owner, name
        assert method.__func__ is patched[name].__func__, name
    assert _adamw_losses(twin, 3) == _adamw_losses(model, 3)  # bit for bit, on a CPU


def test_patched_method_looks_like_a_bound_method():
    lin = torch.nn.Linear(4, 4)
    method = bind(_doubled_forward, lin)
    # transformers' Trainer reads the forward's parameters to keep dataset columns: no ``self``
    assert list(inspect.signature(method).parameters) == ["x"]
    assert method.__name__ == "_doubled_forward" and method.__self__ is lin
    lin.forward = method
    x = torch.randn(2, 4)
    assert torch.equal(lin(x), 2 * torch.nn.functional.linear(x, lin.weight, lin.bias))
    with pytest.raises(TypeError, match="not a module-level function"):
        bind(lambda self, x: x, lin)


def _doubled_forward(self, x):
    return 2 * torch.nn.functional.linear(x, self.weight, self.bias)
