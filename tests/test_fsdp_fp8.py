"""FP8 all-gather's tensor subclasses in one process: transparent to training, checkpoints and
every op but FSDP2's gather (the gather itself runs over gloo in tests/test_distributed.py)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from llama_fixtures import bigram_batches, sgd_steps, tiny_llama

import hf_fp8
from hf_fp8.fsdp_fp8 import Fp8GatheredWeight, Fp8GatherWeight, _cast_shard, fp8_all_gather_layers
from hf_fp8.kernels import quant_reference as R


def _converted(recipe="tensorwise"):
    model = tiny_llama()
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe=recipe, auto_filter=False))
    return model


def test_wrapped_weights_change_nothing_outside_fsdp(tmp_path):
    model, ref = _converted(), _converted()
    assert hf_fp8.enable_fp8_all_gather(model) == 14 == len(fp8_all_gather_layers(model))
    assert hf_fp8.enable_fp8_all_gather(model) == 14  # idempotent
    assert isinstance(model.model.layers[0].mlp.up_proj.weight.data, Fp8GatherWeight)
    batches = lambda: bigram_batches(2, 32, 512, seed=1)  # noqa: E731
    assert sgd_steps(model, batches(), 3) == sgd_steps(ref, batches(), 3)
    model.save_pretrained(tmp_path)  # checkpoints hold plain weights
    sd = model.state_dict()
    assert type(sd["model.layers.0.mlp.up_proj.weight"]) is torch.Tensor
    assert type(pickle.loads(pickle.dumps(model.model.layers[0].mlp.up_proj.weight.data))) is torch.Tensor


def test_other_recipes_keep_their_gather_and_say_so():
    with pytest.warns(UserWarning, match="rowwise and blockwise scales"):
        assert hf_fp8.enable_fp8_all_gather(_converted("rowwise")) == 0


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_a_shard_casts_to_the_codes_the_whole_weight_casts_to(recipe):
    """One process: the shard is the weight; its codes are the cast of the gathered weight's."""
    model = _converted(recipe)
    layer = model.model.layers[0].mlp.up_proj
    w = layer.weight.detach()
    codes, scale_inv = _cast_shard(layer, w, None)
    ref = R.quantize_tensorwise_reference(w, torch.float8_e4m3fn)
    assert torch.equal(codes.view(torch.uint8), ref.data.view(torch.uint8))
    assert torch.equal(scale_inv, ref.scale_inv)


def test_the_gathered_weight_multiplies_its_codes_and_dequantizes_for_anything_else():
    w = torch.randn(32, 48)
    q = R.quantize_tensorwise_reference(w, torch.float8_e4m3fn)
    g = Fp8GatheredWeight(q.data, q.scale_inv.reshape(()), torch.bfloat16)
    assert g.dtype == torch.bfloat16 and g.shape == (32, 48)
    view = torch.as_strided(g, (16, 48), (48, 1))
    assert isinstance(view, Fp8GatheredWeight) and view._codes.shape == (16, 48)
    dense = (q.data.float() * q.scale_inv).to(torch.bfloat16)
    assert torch.equal(g + 0, dense)  # any other op sees the dequantized weight
    x = torch.randn(4, 48, dtype=torch.bfloat16)
    layer = hf_fp8.Fp8Linear.from_linear(torch.nn.Linear(48, 32, bias=False), hf_fp8.Fp8Config(recipe="tensorwise"))
    layer.weight = torch.nn.Parameter(copy.copy(g))
    # the layer casts x and multiplies the gathered codes: the emulated GEMM on the same operands
    qx = R.quantize_tensorwise_reference(x, torch.float8_e4m3fn)
    want = ((qx.data.float() @ q.data.float().t()) * (qx.scale_inv * q.scale_inv)).to(torch.bfloat16)
    assert torch.equal(layer(x), want)
