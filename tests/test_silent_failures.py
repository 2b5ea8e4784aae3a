"""Nothing silently wrong: one test per defect a robustness probe found (each failed before its fix).

1 stale weights, 2 resume from the wrong place, 3 FP8 state lost without a word, 4 load_fp8's
block shapes and shards, 5 an --fp8 JSON's auto_filter, 6 converting again with another recipe,
7 meta-device init, 8 one non-finite batch freezing delayed scales, 9 save_fp8 over an earlier
export, 10 margin's range, 11 unhelpful messages.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import warnings

import pytest
import torch
import transformers
from llama_fixtures import bigram_batches, tiny_llama, train_losses
from safetensors.torch import load_file, save_file
from test_trainer import _args, _Data, _losses

import hf_fp8
from hf_fp8.state import FP8_STATE_FILE, Fp8StateError, Fp8StateWarning, fp8_state_dict, load_fp8_state

DELAYED = dict(fp8="delayed", fp8_auto_filter=False)


# ---- 1. stale weights ---------------------------------------------------------------------------
class _SubmoduleLossTrainer(hf_fp8.Trainer):
    """A custom loss that runs the decoder and the head itself (distillation, TRL-style losses)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        hidden = model.model(input_ids=inputs["input_ids"]).last_hidden_state
        logits = model.lm_head(hidden).float()
        labels = inputs["labels"]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )
        return (loss, None) if return_outputs else loss


def test_stale_weights_custom_compute_loss_on_submodules_trains_on_updated_weights(tmp_path):
    """The Trainer's defaults (BF16 parameters: hf_fp8's AdamW) and --fp8_defer_step true both give
    the losses of updates in optimizer.step(), bit for bit, with a compute_loss that never calls the
    top-level model (the deferred update ran one step late there: 5.856 vs 5.737 at step 6)."""
    runs = {}
    for name, extra in {"default": {}, "step": dict(fp8_defer_step=False), "defer": dict(fp8_defer_step=True)}.items():
        with hf_fp8.set_default_dtype(torch.bfloat16):
            model = tiny_llama()
        args = _args(tmp_path / name, max_steps=6, **DELAYED, **extra)
        trainer = _SubmoduleLossTrainer(model=model, args=args, train_dataset=_Data())
        trainer.train()
        assert type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer) is (
            hf_fp8.optim.AdamW
        )
        runs[name] = _losses(trainer)
    assert runs["default"] == runs["step"] == runs["defer"], runs


def test_stale_weights_attached_model_pickles_and_copies_with_inert_hooks():
    """``torch.save(model)`` after ``attach`` works (it failed on a local closure), and a deep copy's
    hooks do not reach the original optimizer."""
    with hf_fp8.set_default_dtype(torch.bfloat16):
        model = tiny_llama()
    opt = hf_fp8.optim.AdamW(model.parameters(), lr=1e-2, defer_step=True, seed=0)
    opt.attach(model)
    ids = next(bigram_batches(2, 16, 512))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert opt.pending
    buf = io.BytesIO()
    torch.save(model, buf)  # pickles the model with its hooks
    twin = copy.deepcopy(model)
    twin(input_ids=ids)
    assert opt.pending, "the copy's forward ran the original optimizer's update"
    model(input_ids=ids)
    assert not opt.pending
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    loaded(input_ids=ids)  # its hooks are inert: no optimizer


# ---- 2. resume from the wrong place ---------------------------------------------------------------
class _Snapshot(transformers.TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state = fp8_state_dict(model)


def _stock_trainer(out, seed=0, **kw):
    model = tiny_llama(seed=seed)
    args = _args(out, save_strategy="steps", save_steps=2, seed=seed, **DELAYED, **kw)
    snapshot = _Snapshot()
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_Data(), callbacks=[hf_fp8.Fp8Callback(), snapshot]
    )
    return trainer, snapshot


def test_resume_from_the_wrong_place_never_takes_another_runs_fp8_state(tmp_path):
    first, _ = _stock_trainer(tmp_path / "a", max_steps=2)
    first.train()
    other, _ = _stock_trainer(tmp_path / "c", seed=1, max_steps=2)  # another run, same checkpoint number
    other.train()
    saved = load_file(str(tmp_path / "a" / "checkpoint-2" / FP8_STATE_FILE))
    foreign = load_file(str(tmp_path / "c" / "checkpoint-2" / FP8_STATE_FILE))
    assert any(not torch.equal(saved[k], foreign[k]) for k in saved)

    # resumed from a/ while output_dir (c/) holds another run's checkpoint-2: not taken, and said
    resumed, snap = _stock_trainer(tmp_path / "c", max_steps=3)
    with pytest.warns(Fp8StateWarning, match="none of .* holds the Trainer state"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert any(not torch.equal(snap.state[k], foreign[k]) for k in foreign)

    # the same, told where it resumed from: the saved state is restored
    resumed, snap = _stock_trainer(
        tmp_path / "c", max_steps=3, resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", Fp8StateWarning)
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for k, v in saved.items():
        assert torch.equal(snap.state[k], v), k

    # strict: an error instead of the warning
    resumed, _ = _stock_trainer(tmp_path / "c", max_steps=3, fp8_strict_resume=True)
    with pytest.raises(Fp8StateError, match="none of"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


# ---- 3. FP8 state lost without a word ----------------------------------------------------------------
@pytest.fixture(scope="module")
def delayed_checkpoint(tmp_path_factory):
    """A 2-step hf_fp8.Trainer run with the delayed recipe and its checkpoint-2."""
    out = tmp_path_factory.mktemp("run")
    trainer = hf_fp8.Trainer(
        model=tiny_llama(), args=_args(out, max_steps=2, save_strategy="steps", save_steps=2, **DELAYED),
        train_dataset=_Data(),
    )  # fmt: skip
    trainer.train()
    return out / "checkpoint-2"


def _delayed_model(**cfg):
    model = tiny_llama()
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="delayed", auto_filter=False, **cfg))
    return model


def test_fp8_state_lost_without_a_word_is_now_said(tmp_path, delayed_checkpoint):
    path = delayed_checkpoint / FP8_STATE_FILE
    good = load_file(str(path))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    # missing: named, and what starts afresh; strict raises
    with pytest.warns(Fp8StateWarning, match=rf"{FP8_STATE_FILE} is missing.*14 delayed-scaling layers start afresh"):
        assert load_fp8_state(_delayed_model(), ckpt) == 0
    with pytest.raises(Fp8StateError, match="is missing"):
        load_fp8_state(_delayed_model(), ckpt, strict=True)
    # truncated: the file is named
    (ckpt / FP8_STATE_FILE).write_bytes(path.read_bytes()[:40])
    with pytest.warns(Fp8StateWarning, match=rf"{ckpt / FP8_STATE_FILE} cannot be read"):
        load_fp8_state(_delayed_model(), ckpt)
    # keys matching nothing
    save_file({f"other.{k}": v for k, v in good.items()}, str(ckpt / FP8_STATE_FILE))
    with pytest.warns(Fp8StateWarning, match="14 of 14 delayed-scaling layers are not in it"):
        assert load_fp8_state(_delayed_model(), ckpt) == 0
    # another history length: named, not a size-mismatch traceback
    shutil.copy(path, ckpt / FP8_STATE_FILE)
    with pytest.raises(Fp8StateError, match=r"another amax history length.*saved history \(16, 3\), model \(8, 3\)"):
        load_fp8_state(_delayed_model(amax_history_len=8), ckpt, strict=True)
    # non-finite histories: restored as 0 (ignored by the scale update), with a warning
    poisoned = {k: v.clone() for k, v in good.items()}
    key = next(k for k in poisoned if k.endswith("fp8_amax_history"))
    poisoned[key][1, 0] = float("nan")
    save_file(poisoned, str(ckpt / FP8_STATE_FILE))
    model = _delayed_model()
    with pytest.warns(Fp8StateWarning, match="hold inf/NaN"):
        assert load_fp8_state(model, ckpt) == 14
    assert torch.isfinite(fp8_state_dict(model)[key]).all()
    # and a good file restores every layer without a word
    model = _delayed_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Fp8StateWarning)
        assert load_fp8_state(model, delayed_checkpoint) == 14
    for k, v in good.items():
        assert torch.equal(fp8_state_dict(model)[k], v)


def test_fp8_state_lost_without_a_word_trainer_resume_warns_or_fails_strict(tmp_path, delayed_checkpoint):
    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(delayed_checkpoint, ckpt)
    (ckpt / FP8_STATE_FILE).unlink()  # as if the process died after HF wrote its files
    for strict in (False, True):
        trainer = hf_fp8.Trainer(
            model=tiny_llama(), args=_args(tmp_path / str(strict), max_steps=3, fp8_strict_resume=strict, **DELAYED),
            train_dataset=_Data(),
        )  # fmt: skip
        if strict:
            with pytest.raises(Fp8StateError, match="is missing"):
                trainer.train(resume_from_checkpoint=str(ckpt))
        else:
            with pytest.warns(Fp8StateWarning, match="is missing"):
                trainer.train(resume_from_checkpoint=str(ckpt))


def test_fp8_state_is_written_before_transformers_checkpoint_files(tmp_path, monkeypatch):
    """hf_fp8.Trainer and the stock Trainer + Fp8Callback: when transformers starts writing a
    checkpoint, the FP8 state is already there."""
    seen = []
    real = transformers.Trainer.save_model

    def save_model(self, output_dir=None, _internal_call=False):
        if _internal_call:
            seen.append(os.path.isfile(os.path.join(output_dir, FP8_STATE_FILE)))
        return real(self, output_dir, _internal_call)

    monkeypatch.setattr(transformers.Trainer, "save_model", save_model)
    args = _args(tmp_path / "ours", max_steps=2, save_strategy="steps", save_steps=2, **DELAYED)
    hf_fp8.Trainer(model=tiny_llama(), args=args, train_dataset=_Data()).train()
    stock, _ = _stock_trainer(tmp_path / "stock", max_steps=2)
    stock.train()
    assert seen == [True, True]


# ---- 4. load_fp8: any block shape, per-channel and per-tensor scales, shards ---------------------------
def _export(model, directory, scales, block_size, *, shards=1):
    """``model`` in transformers' FP8 format with the given scale granularity, written by hand."""
    model.config.save_pretrained(directory)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": block_size,
    }
    (directory / "config.json").write_text(json.dumps(cfg))
    state, exact = {}, {}
    for key, w in model.state_dict().items():
        if key.endswith("proj.weight"):
            q, s = scales(w.float())
            state[key], state[key.replace(".weight", ".weight_scale_inv")] = q, s
            exact[key] = q
        else:
            state[key] = w.contiguous()
    keys = sorted(state)
    groups = [keys[i::shards] for i in range(shards)]
    if shards == 1:
        save_file(state, str(directory / "model.safetensors"))
    else:
        weight_map = {}
        for i, group in enumerate(groups):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k] for k in group}, str(directory / name))
            weight_map.update({k: name for k in group})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return state


def _blocks(bm, bn):
    def quantize(w):
        N, K = w.shape
        nb, kb = -(-N // bm), -(-K // bn)
        pad = torch.zeros(nb * bm, kb * bn)
        pad[:N, :K] = w
        amax = pad.view(nb, bm, kb, bn).abs().amax(dim=(1, 3)).clamp_min(1e-12)
        s = amax / 448
        q = (pad.view(nb, bm, kb, bn) / s[:, None, :, None]).view(nb * bm, kb * bn)[:N, :K]
        return q.to(torch.float8_e4m3fn).contiguous(), s

    return quantize


def _per_channel(w):
    s = w.abs().amax(dim=1, keepdim=True) / 448
    return (w / s).to(torch.float8_e4m3fn), s


def _per_tensor(w):
    s = w.abs().max() / 448
    return (w / s).to(torch.float8_e4m3fn), s.reshape(())


def _exact_dequant(q, s, block):
    """float64 reference: each element times the scale of its block / row / tensor."""
    N, K = q.shape
    q64 = q.double()
    if s.numel() == 1:
        return q64 * s.double()
    if block is None or s.shape == (N, 1):
        return q64 * s.double().reshape(N, 1)
    r = torch.arange(N)[:, None] // block[0]
    c = torch.arange(K)[None, :] // block[1]
    return q64 * s.double()[r, c]


@pytest.mark.parametrize(
    "scales, block, shards",
    [
        (_blocks(128, 64), [128, 64], 1),  # read as [128, 128] before: 11.6% of the weights wrong
        (_blocks(64, 128), [64, 128], 1),  # a shape error before
        (_blocks(1, 128), [1, 128], 1),  # DeepSeek-style 1x128 rows
        (_blocks(32, 32), [32, 32], 3),  # sharded with an index
        (_per_channel, None, 1),
        (_per_tensor, None, 2),
    ],
    ids=["128x64", "64x128", "1x128", "32x32-sharded", "per-channel", "per-tensor-sharded"],
)
def test_load_fp8_block_shapes_and_shards_dequantize_exactly(tmp_path, scales, block, shards):
    model = tiny_llama(hidden_size=256, intermediate_size=384)
    state = _export(model, tmp_path, scales, block, shards=shards)
    loaded, _ = hf_fp8.load_fp8(tmp_path, dtype=torch.float32)
    got = loaded.state_dict()
    n = 0
    for key, q in state.items():
        if q.dtype != torch.float8_e4m3fn:
            continue
        ref = _exact_dequant(q, state[key.replace(".weight", ".weight_scale_inv")], block).float()
        assert torch.equal(got[key], ref), key  # FP32 product of two exact values: one rounding
        n += 1
    assert n == 7 * model.config.num_hidden_layers


def test_load_fp8_rejects_a_scale_that_fits_no_granularity(tmp_path):
    model = tiny_llama()
    _export(model, tmp_path, _blocks(128, 64), [128, 128])  # the config lies about the blocks
    with pytest.raises(ValueError, match=r"in \[128, 128\] blocks needs a"):
        hf_fp8.load_fp8(tmp_path)


# ---- 5. an --fp8 JSON's auto_filter -----------------------------------------------------------------
def test_fp8_json_config_auto_filter_is_not_overridden_by_the_cli_default(tmp_path):
    path = tmp_path / "cfg.json"
    hf_fp8.Fp8Config(recipe="delayed", auto_filter=False).to_json(path)
    parser = transformers.HfArgumentParser(hf_fp8.TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--fp8", str(path), "--use_cpu"])
    assert args.fp8_config().auto_filter is False
    model = tiny_llama()
    report = hf_fp8.convert(model, args.fp8_config())
    assert len(report.converted) == 14  # every decoder linear (0 before: the filter was back on); lm_head stays
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--fp8", str(path), "--fp8_auto_filter", "true", "--use_cpu"]
    )
    assert args.fp8_config().auto_filter is True  # what the command line says explicitly wins


# ---- 6. converting again with another recipe -------------------------------------------------------
def test_converting_again_with_another_recipe_is_an_error_not_a_false_report(tmp_path):
    model = tiny_llama()
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="rowwise", auto_filter=False))
    again = hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="rowwise", auto_filter=False))  # same: a no-op
    assert again.converted
    with pytest.raises(ValueError, match=r"already converted .*row.*recipe: rowwise -> delayed.*hf_fp8.revert"):
        hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="delayed", auto_filter=False))
    with pytest.raises(ValueError, match="already converted"):
        hf_fp8.Trainer(model=model, args=_args(tmp_path, fp8="delayed"), train_dataset=_Data())
    hf_fp8.revert(model)
    report = hf_fp8.convert(model, hf_fp8.Fp8Config(recipe="delayed", auto_filter=False))
    assert all(m.fp8_config.recipe.value == "delayed" for m in model.modules() if isinstance(m, hf_fp8.Fp8Linear))
    assert report.config_str.startswith("dly")


# ---- 7. meta-device init ---------------------------------------------------------------------------
def _train_steps(model, steps=4):
    return train_losses(model, torch.optim.AdamW(model.parameters(), lr=3e-3), steps, batch=4)


@pytest.mark.parametrize("assign", [False, True], ids=["to_empty", "assign"])
def test_meta_device_init_gives_fresh_fp8_state(assign):
    """Built on meta, converted, then materialized (to_empty + load, or load_state_dict(assign=True),
    what from_pretrained's low-memory path and FSDP2 meta init do): no layer flagged non-finite,
    empty histories, and the same losses as a model built on the CPU."""
    cfg = hf_fp8.Fp8Config(recipe="delayed", auto_filter=False, exclude=("lm_head",))
    ref = tiny_llama()
    weights = copy.deepcopy(ref.state_dict())
    hf_fp8.convert(ref, cfg)
    with torch.device("meta"):
        model = tiny_llama()
    hf_fp8.convert(model, cfg)
    if assign:
        model.load_state_dict(weights, assign=True, strict=False)
    else:
        model.to_empty(device="cpu")
        model.load_state_dict(weights, strict=False)
    _copy_rotary_buffers(model, ref)  # not in a checkpoint either: what from_pretrained recomputes
    assert hf_fp8.nonfinite_modules(model) == {}
    assert all(not v.any() for k, v in fp8_state_dict(model).items() if k.endswith("history"))
    assert _train_steps(model) == _train_steps(ref)


def _copy_rotary_buffers(model, ref):
    for name, buf in ref.model.rotary_emb.named_buffers():
        model.model.rotary_emb.register_buffer(name, buf.clone(), persistent=False)


# ---- 8. one non-finite batch ---------------------------------------------------------------------------
def test_one_nonfinite_batch_does_not_freeze_delayed_scales():
    """After a batch with inf/NaN activations, the scales come from the finite amaxes in the
    histories: the same scales and loss as a twin whose histories never saw that batch's NaN
    (recorded there as 0). Before, the NaN held each affected scale for amax_history_len steps."""
    # a short history, so that the bad batch's NaN sits beside the newest finite amaxes (a longer
    # one would take more steps to show the frozen scales)
    model = _delayed_model(exclude=("lm_head",), amax_history_len=2)
    data = bigram_batches(4, 32, 512, seed=0)
    _train_steps(model, 3)
    ids = next(data)
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: out * float("nan"))
    model(input_ids=ids, labels=ids).loss.backward()  # the bad batch: no optimizer step
    hook.remove()
    model.zero_grad(set_to_none=True)
    assert hf_fp8.nonfinite_modules(model)  # it was flagged
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, hf_fp8.Fp8Linear):
            m.fp8_amax_history.nan_to_num_(nan=0.0, posinf=0.0)
    nan_slots = sum(int((~torch.isfinite(v)).any()) for k, v in fp8_state_dict(model).items() if "history" in k)
    assert nan_slots > 0
    ids = next(data)
    for m in (model, twin):
        m(input_ids=ids, labels=ids).loss.backward()
    for (k, a), b in zip(fp8_state_dict(model).items(), fp8_state_dict(twin).values()):
        if k.endswith("fp8_scale"):
            assert torch.equal(a, b), k
    assert all(torch.isfinite(v).all() for k, v in fp8_state_dict(model).items() if k.endswith("fp8_scale"))


# ---- 9. save_fp8 over an earlier export ----------------------------------------------------------------
def test_save_fp8_over_an_earlier_export_is_atomic_and_removes_stale_shards(tmp_path, monkeypatch):
    model = tiny_llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="200KB")  # a sharded stock checkpoint first
    assert (tmp_path / "model.safetensors.index.json").exists()
    hf_fp8.save_fp8(model, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in names and not [n for n in names if n.startswith("model-") or "index" in n], names
    hf_fp8.load_fp8(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # a failure while writing the weights, or serializing the config, leaves the export as it was
    import safetensors.torch

    import hf_fp8.integrations.export as export

    def fail(*args, **kwargs):
        raise OSError("disk full")

    for target, name in ((export.json, "dumps"), (safetensors.torch, "save_file")):
        with monkeypatch.context() as m:
            m.setattr(target, name, fail)
            with pytest.raises(OSError, match="disk full"):
                hf_fp8.save_fp8(tiny_llama(seed=5).to(torch.bfloat16), tmp_path)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, name
        hf_fp8.load_fp8(tmp_path)


# ---- 10. margin ------------------------------------------------------------------------------------
def test_margin_beyond_eight_is_an_error_and_eight_trains():
    with pytest.raises(ValueError, match="margin: got 9; expected an int from 0 to 8"):
        hf_fp8.Fp8Config(recipe="delayed", margin=9)
    model = _delayed_model(margin=8, exclude=("lm_head",))
    losses = _train_steps(model, 3)
    assert all(torch.isfinite(torch.tensor(losses))) and hf_fp8.nonfinite_modules(model) == {}


# ---- 11. unhelpful messages --------------------------------------------------------------------------------
def test_unhelpful_messages_now_say_what_is_wrong(tmp_path, capsys):
    from hf_fp8.integrations.accelerate_plugin import config_from_environment

    fp8_env = {"ACCELERATE_MIXED_PRECISION": "fp8"}
    with pytest.raises(ValueError, match=r"ACCELERATE_FP8_AMAX_HISTORY_LEN='abc': expected an integer"):
        config_from_environment({**fp8_env, "ACCELERATE_FP8_AMAX_HISTORY_LEN": "abc"})
    with pytest.raises(ValueError, match=r"ACCELERATE_FP8_FORMAT='BOGUS': expected one of \['E4M3', 'HYBRID'\]"):
        config_from_environment({**fp8_env, "ACCELERATE_FP8_FORMAT": "BOGUS"})
    with pytest.raises(ValueError, match=r"betas must be a pair \(beta1, beta2\).*got 0.9"):
        hf_fp8.optim.AdamW(torch.nn.Linear(4, 4).parameters(), betas=0.9)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        hf_fp8.load_fp8(tmp_path / "missing")
    with pytest.warns(UserWarning, match=r"exclude pattern 'k_proj' matches none of the model's"):
        hf_fp8.convert(tiny_llama(), hf_fp8.Fp8Config(exclude=("k_proj",)))
    with pytest.warns(UserWarning, match=r"include pattern '\*\.q_prj' matches none"):
        hf_fp8.convert(tiny_llama(), hf_fp8.Fp8Config(include=("*.q_prj",)))


def test_unhelpful_messages_monitor_log_has_each_step_once_after_a_resume(tmp_path):
    from hf_fp8.monitor.records import LOG_NAME, read_records

    def run(max_steps, resume=None):
        args = _args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2, fp8_monitor_interval=1,
                     **DELAYED)  # fmt: skip
        hf_fp8.Trainer(model=tiny_llama(), args=args, train_dataset=_Data()).train(resume_from_checkpoint=resume)

    run(3)  # steps 1-3 logged, checkpoint at 2
    run(4, resume=str(tmp_path / "checkpoint-2"))  # steps 3-4 again
    steps = [r["step"] for r in read_records(tmp_path / LOG_NAME)]
    assert steps == [1, 2, 3, 4], steps
