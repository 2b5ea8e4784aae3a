"""FP8 export in transformers' fine-grained FP8 format: round trip, and transformers' own loader."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import sqnr_db
from llama_fixtures import tiny_llama
from safetensors.torch import load_file

import hf_fp8
from hf_fp8.integrations.export import dequantize_blockwise, quantize_blockwise


def test_blockwise_quantization_against_float64():
    w = torch.randn(300, 200) * torch.logspace(-2, 1, 300)[:, None]  # partial edge blocks, varied block amax
    q, s = quantize_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and s.shape == (3, 2)
    d = dequantize_blockwise(q, s, torch.float32)
    # E4M3 rounding per element: relative error at most 2^-4 for normal values -> ~29 dB
    assert sqnr_db(w.double(), d) > 27
    assert torch.equal(q[0:128, 0:128].float().abs().max(), torch.tensor(448.0))  # each block's amax maps to 448
    z, sz = quantize_blockwise(torch.zeros(128, 128))
    assert (sz == 1).all() and (z.float() == 0).all()


def test_round_trip_and_continue_fp8_training(tmp_path):
    model = tiny_llama(num_key_value_heads=4).to(torch.bfloat16)  # every dim a multiple of 128
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="delayed", auto_filter=False))
    hf_fp8.save_fp8(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg == {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head"],
    }
    raw = load_file(tmp_path / "model.safetensors")
    assert raw["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert raw["model.layers.0.mlp.up_proj.weight_scale_inv"].shape == (2, 1)  # 256 x 128 weight
    assert raw["lm_head.weight"].dtype == torch.bfloat16 and not any("fp8_amax" in k for k in raw)

    loaded, report = hf_fp8.load_fp8(tmp_path, hf_fp8.Fp8Config(recipe="delayed", auto_filter=False))
    assert (
        isinstance(loaded.model.layers[0].mlp.up_proj, hf_fp8.Fp8Linear) and len(report.converted) == 14
    )  # lm_head stays BF16
    w0 = model.model.layers[0].mlp.up_proj.weight
    w1 = loaded.model.layers[0].mlp.up_proj.weight
    q, s = quantize_blockwise(w0.detach())
    assert torch.equal(w1, dequantize_blockwise(q, s, torch.bfloat16))  # exactly the stored FP8 values
    assert sqnr_db(w0.detach().double(), w1) > 25
    ids = torch.randint(0, 512, (2, 16))
    loaded(input_ids=ids, labels=ids).loss.backward()  # trainable again
    assert loaded.model.layers[0].mlp.up_proj.weight.grad is not None


# transformers' loader takes one weight_block_size for the whole checkpoint and needs every
# quantized weight's shape to be a multiple of it: dims that 128 does not divide (hidden 576,
# k/v 192, as SmolLM-135M has) once made every projection unreadable
SHAPES = {
    "dims of 128": dict(hidden_size=128, num_key_value_heads=4),
    "hidden 576, k/v 192": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_transformers_own_fp8_loader_reads_it(tmp_path, shape):
    """Checked against the real transformers loader (finegrained FP8 quantizer), dequantizing on CPU."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    model = tiny_llama(**shape).to(torch.bfloat16)
    hf_fp8.save_fp8(model, tmp_path)
    block = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["weight_block_size"]
    assert block == ([128, 128] if shape["hidden_size"] % 128 == 0 else [64, 64])
    ours, _ = hf_fp8.load_fp8(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=FineGrainedFP8Config(dequantize=True), dtype=torch.bfloat16
    )
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    for k, v in sd_ours.items():
        assert torch.equal(sd_theirs[k].to(v.dtype), v), k
    ids = torch.randint(0, 512, (1, 12))
    assert torch.equal(
        ours.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0),
        theirs.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0),
    )


def test_layers_no_block_divides_are_kept_out_of_the_export(tmp_path):
    """intermediate 1032 (8 x 129): no block of 16 or more divides the MLP's dims, so those layers
    are written in BF16 and listed in modules_to_not_convert, and the export still loads."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    model = tiny_llama(intermediate_size=1032).to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"weight_block_size \[16, 16\] does not divide"):
        hf_fp8.save_fp8(model, tmp_path)
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qcfg["weight_block_size"] == [16, 16]
    mlp = [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    assert sorted(qcfg["modules_to_not_convert"]) == sorted(["lm_head", *mlp])
    raw = load_file(tmp_path / "model.safetensors")
    assert raw["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert raw["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    ours, _ = hf_fp8.load_fp8(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=FineGrainedFP8Config(dequantize=True), dtype=torch.bfloat16
    )
    for k, v in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[k].to(v.dtype), v), k
    assert torch.equal(ours.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["a tiny corpus for a tiny tokenizer"] * 4, trainers.BpeTrainer(vocab_size=300))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def test_sharded_export_with_tokenizer_loads_like_a_hub_checkpoint(tmp_path):
    """max_shard_size shards the weights as save_pretrained names them; the tokenizer and generation
    config are saved beside them; load_fp8 and transformers' own loader both read it (hidden 576)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, FineGrainedFP8Config

    model = tiny_llama(**SHAPES["hidden 576, k/v 192"]).to(torch.bfloat16)
    hf_fp8.save_fp8(model, tmp_path, max_shard_size="1MB", tokenizer=_tokenizer())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / s).exists() for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "generation_config.json").exists() and (tmp_path / "tokenizer.json").exists()
    assert AutoTokenizer.from_pretrained(tmp_path)("a tiny corpus")["input_ids"]
    ours, _ = hf_fp8.load_fp8(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=FineGrainedFP8Config(dequantize=True), dtype=torch.bfloat16
    )
    for k, v in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[k].to(v.dtype), v), k
    hf_fp8.save_fp8(model, tmp_path)  # one file again: the shards and their index go
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_push_to_hub_and_load_from_a_hub_id(tmp_path, monkeypatch):
    """The Hub calls, recorded: save_fp8(push_to_hub=repo) creates the repo and uploads the folder;
    load_fp8(repo id) downloads the snapshot (here: a local folder) and reads it."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id))
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "upload_folder",
        lambda self, *, repo_id, folder_path, **kw: calls.append(("upload", repo_id, folder_path)),
    )
    model = tiny_llama().to(torch.bfloat16)
    hf_fp8.save_fp8(model, tmp_path / "export", push_to_hub="me/tiny-fp8")
    assert calls == [("create", "me/tiny-fp8"), ("upload", "me/tiny-fp8", str(tmp_path / "export"))]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path / "export"))
    loaded, _ = hf_fp8.load_fp8("me/tiny-fp8")
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)

    def offline(repo_id, **kw):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(
        FileNotFoundError, match="'me/other' is not a local folder, and the Hub download failed: no network"
    ):
        hf_fp8.load_fp8("me/other")
