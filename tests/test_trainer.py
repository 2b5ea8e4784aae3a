"""The Trainer flag: CLI parsing, hf_fp8.Trainer, the stock Trainer with Fp8Callback, and the guard
that stops a run whose FP8 arguments were never applied."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from llama_fixtures import bigram_batches, tiny_llama

import hf_fp8
from hf_fp8.optim import AdamW


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=64, seq=32):
        gen = bigram_batches(n, seq, 512, seed=0)
        self.ids = next(gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return hf_fp8.TrainingArguments(**base)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_cli_flags_parse_and_serialize(tmp_path):
    parser = transformers.HfArgumentParser(hf_fp8.TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--fp8",
            "delayed",
            "--fp8_exclude",
            "*.k_proj",
            "*.v_proj",
            "--fp8_auto_filter",
            "false",
            "--report_to",
            "none",
        ]
    )
    cfg = args.fp8_config()
    assert cfg.recipe is hf_fp8.Recipe.DELAYED and cfg.exclude == ("*.k_proj", "*.v_proj") and not cfg.auto_filter
    d = json.loads(args.to_json_string())
    assert d["fp8"] == "delayed" and d["fp8_exclude"] == ["*.k_proj", "*.v_proj"]
    # a JSON config file works as --fp8 too
    path = tmp_path / "fp8.json"
    hf_fp8.Fp8Config(recipe="rowwise", amax_history_len=4).to_json(path)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--fp8", str(path)])
    assert args.fp8_config().recipe is hf_fp8.Recipe.ROWWISE
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--fp8", "tensorwise", "--fp8_weights"]
    )
    assert args.fp8_config().fp8_weights and not args.fp8_config().save_weight_transpose  # Fp8Config's default
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--fp8", "delayed", "--fp8_save_weight_transpose", "true"]
    )
    assert args.fp8_config().save_weight_transpose
    # a JSON config's choice stands unless the flag is given
    hf_fp8.Fp8Config(recipe="delayed", save_weight_transpose=True).to_json(path)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--fp8", str(path)])
    assert args.fp8_config().save_weight_transpose
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--fp8", str(path), "--fp8_save_weight_transpose", "false"]
    )
    assert not args.fp8_config().save_weight_transpose


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(fp8="rowwise", full_bf16=True), "exclude each other"),
        (dict(fp8="fp4"), "expected 'delayed', 'tensorwise', 'rowwise', 'blockwise', 'none'"),
        (dict(fp8="tensorwise", fp16=True), "--fp16 cannot be combined"),
        (dict(fp8_attention=True), "--fp8_attention needs --fp8"),
        (dict(fp8_weights=True), "--fp8_weights needs --fp8"),
        (dict(fp8="rowwise", fp8_weights=True), "scaled per column"),
        (dict(fp8_keep_activations="2"), "--fp8_keep_activations needs --fp8 or --full_bf16"),
        (dict(fp8="delayed", fp8_keep_activations="most"), "keep_activations"),
    ],
)
def test_conflicting_arguments(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, **kw)


def test_keep_activations_flag_reaches_the_config(tmp_path):
    assert _args(tmp_path, fp8="delayed").fp8_config().keep_activations == "auto"
    assert _args(tmp_path, fp8="delayed", fp8_keep_activations="0").fp8_config().keep_activations == 0
    assert _args(tmp_path, full_bf16=True, fp8_keep_activations="3").fp8_config().keep_activations == 3


def test_accelerate_fp8_env_conflict(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ValueError, match="two FP8 implementations"):
        _args(tmp_path, fp8="tensorwise")


@pytest.mark.smoke
def test_hf_fp8_trainer_trains_in_fp8(tmp_path):
    model = tiny_llama()
    trainer = hf_fp8.Trainer(
        model=model,
        args=_args(tmp_path, fp8="tensorwise", fp8_auto_filter=False, fp8_exclude=["lm_head"]),
        train_dataset=_Data(),
    )
    assert isinstance(model.model.layers[0].mlp.up_proj, hf_fp8.Fp8Linear)
    assert trainer.fp8_report is not None and len(trainer.fp8_report.converted) == 14
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] * 0.9, losses
    assert isinstance(trainer.model.model.layers[1].self_attn.q_proj, hf_fp8.Fp8Linear)


@pytest.mark.smoke
def test_stock_trainer_with_callback(tmp_path):
    model = tiny_llama()
    cb = hf_fp8.Fp8Callback()
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path, fp8="rowwise", fp8_auto_filter=False), train_dataset=_Data(), callbacks=[cb]
    )
    assert isinstance(model.model.layers[0].mlp.down_proj, hf_fp8.Fp8Linear)
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] * 0.9, losses


def test_unapplied_fp8_arguments_stop_training(tmp_path):
    trainer = transformers.Trainer(model=tiny_llama(), args=_args(tmp_path, fp8="tensorwise"), train_dataset=_Data())
    with pytest.raises(RuntimeError, match=r"callbacks=\[hf_fp8.Fp8Callback\(\)\]"):
        trainer.train()


def test_full_bf16_trainer_uses_fp32_state_adamw(tmp_path):
    with hf_fp8.set_default_dtype(torch.bfloat16):
        model = tiny_llama()
    trainer = hf_fp8.Trainer(model=model, args=_args(tmp_path, full_bf16=True, max_steps=4), train_dataset=_Data())
    trainer.train()
    assert isinstance(
        trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer, AdamW
    )
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # the stock Trainer + callback refuses full BF16 with its own optimizer
    with hf_fp8.set_default_dtype(torch.bfloat16):
        model2 = tiny_llama()
    stock = transformers.Trainer(
        model=model2,
        args=_args(tmp_path, full_bf16=True, max_steps=2),
        train_dataset=_Data(),
        callbacks=[hf_fp8.Fp8Callback()],
    )
    with pytest.raises(RuntimeError, match="FP32 optimizer states"):
        stock.train()


def test_mixin_for_other_argument_classes():
    from hf_fp8.integrations.trainer import make_training_arguments_class

    Args = make_training_arguments_class(transformers.Seq2SeqTrainingArguments)
    a = Args(output_dir="/tmp/x", fp8="rowwise", report_to="none")
    assert a.fp8_config().recipe is hf_fp8.Recipe.ROWWISE and hasattr(a, "predict_with_generate")


def test_cuda_graph_flag_sets_the_filter_for_graphed_steps(tmp_path):
    args = _args(tmp_path, fp8="delayed", fp8_cuda_graph=True, dataloader_drop_last=True)
    assert args.fp8_config().cuda_graph is True
    assert _args(tmp_path, fp8="delayed").fp8_config().cuda_graph is False


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(), "--dataloader_drop_last"),
        (dict(dataloader_drop_last=True, gradient_accumulation_steps=2), "--gradient_accumulation_steps 1"),
        (dict(dataloader_drop_last=True, fp8="delayed", fp8_monitor_interval=5), "excludes --fp8_monitor_interval"),
        (dict(dataloader_drop_last=True, label_smoothing_factor=0.1), "label_smoothing_factor"),
    ],
)
def test_cuda_graph_flag_refuses_what_a_graph_cannot_replay(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, fp8_cuda_graph=True, **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_graph_flag_needs_a_gpu(tmp_path):
    args = _args(tmp_path, fp8="delayed", fp8_cuda_graph=True, dataloader_drop_last=True)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        hf_fp8.Trainer(model=tiny_llama(), args=args, train_dataset=_Data())


def test_cuda_graph_flag_on_a_trainer_that_cannot_honour_it(tmp_path, monkeypatch):
    from hf_fp8.integrations import trainer as T

    args = _args(tmp_path, fp8="delayed", fp8_cuda_graph=True, dataloader_drop_last=True)
    stock = transformers.Trainer(model=tiny_llama(), args=args, train_dataset=_Data(), callbacks=[hf_fp8.Fp8Callback()])
    with pytest.raises(RuntimeError, match="does not replace its training step"):
        stock.train()

    class OwnLoss(hf_fp8.Trainer):
        def compute_loss(self, model, inputs, **kwargs):
            return super().compute_loss(model, inputs, **kwargs)

    monkeypatch.setattr(T, "_cuda_available", lambda: True)
    args = _args(tmp_path, fp8="delayed", fp8_cuda_graph=True, dataloader_drop_last=True)
    with pytest.raises(ValueError, match="overrides compute_loss"):
        OwnLoss(model=tiny_llama(), args=args, train_dataset=_Data())


def test_cuda_graph_flag_routes_every_step_through_the_graph_step(tmp_path, monkeypatch):
    """The Trainer's step with --fp8_cuda_graph calls hf_fp8.CudaGraphStep once per step and trains
    exactly as its own step does (CPU: a stand-in that runs the same forward and backward eagerly;
    the real capture is tested on the GPU, test_gpu.py)."""
    import hf_fp8.cuda_graph
    from hf_fp8.integrations import trainer as T

    calls = []

    class EagerStandIn:
        def __init__(self, model):
            self.model = model

        def __call__(self, **batch):
            calls.append(sorted(batch))
            loss = self.model(**batch).loss
            loss.backward()
            return loss.detach()

    monkeypatch.setattr(T, "_cuda_available", lambda: True)
    monkeypatch.setattr(hf_fp8.cuda_graph, "CudaGraphStep", EagerStandIn)
    runs = {}
    for graph in (False, True):
        args = _args(tmp_path, fp8="delayed", fp8_auto_filter=False, dataloader_drop_last=True, fp8_cuda_graph=graph)
        trainer = hf_fp8.Trainer(model=tiny_llama(), args=args, train_dataset=_Data())
        trainer.train()
        runs[graph] = _losses(trainer)
    assert len(calls) == 12 and calls[0] == ["input_ids", "labels"]
    assert runs[True] == runs[False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_flag_trains_as_the_eager_trainer_on_gpu(tmp_path):
    """hf_fp8.Trainer with --fp8_cuda_graph on the GPU: losses of the replayed steps within 1e-3 of
    the eager Trainer's (the same kernels; cuDNN attention's backward may sum in another order)."""
    runs = {}
    for graph in (False, True):
        with hf_fp8.set_default_dtype(torch.bfloat16):
            model = tiny_llama(attn_implementation="sdpa")
        args = _args(tmp_path, fp8="delayed", fp8_auto_filter=False, dataloader_drop_last=True, fp8_cuda_graph=graph,
                     use_cpu=False, max_steps=8)  # fmt: skip
        trainer = hf_fp8.Trainer(model=model, args=args, train_dataset=_Data())
        trainer.train()
        runs[graph] = _losses(trainer)
        if graph:
            assert trainer._fp8_graph_step is not None and trainer._fp8_graph_step.graph is not None
    for a, b in zip(runs[False], runs[True], strict=True):
        assert abs(a - b) / abs(a) < 1e-3, runs


def test_fp8_with_bf16_autocast_trains(tmp_path):
    """--fp8 with --bf16: BF16 autocast around everything that is not an FP8 layer, the loss
    included in its region but keeping FP32 logits. (On the GPU the loss used to fail under it;
    the CPU Trainer's autocast does not reach the loss, test_loss.py tests it there directly.)"""
    trainer = hf_fp8.Trainer(
        model=tiny_llama(), args=_args(tmp_path, fp8="delayed", fp8_auto_filter=False, bf16=True), train_dataset=_Data()
    )
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] * 0.9, losses


def _inner(optimizer):
    return optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer


def test_fp8_trainer_swaps_torch_adamw_for_the_one_pass_kernel_on_bf16_params(tmp_path):
    """--fp8 with BF16 parameters and torch's AdamW (the default optim): hf_fp8.optim.AdamW with
    BF16 states (torch's memory) and stochastic rounding; --fp8_adamw false, FP32 parameters or
    another optim keep what the Trainer would build."""
    with hf_fp8.set_default_dtype(torch.bfloat16):
        model = tiny_llama()
    args = _args(tmp_path, fp8="tensorwise", fp8_auto_filter=False, max_steps=3, weight_decay=0.1)
    trainer = hf_fp8.Trainer(model=model, args=args, train_dataset=_Data())
    trainer.train()
    opt = _inner(trainer.optimizer)
    assert isinstance(opt, AdamW) and opt.state_dtype == torch.bfloat16
    assert all(g["stochastic_rounding"] for g in opt.param_groups)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1, 0.0}  # norms and biases: no decay, as HF groups them
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in opt.state.values())
    assert len(opt.state) == sum(p.requires_grad for p in model.parameters())

    for kw, bf16 in ((dict(fp8_adamw=False), True), (dict(optim="sgd"), True), ({}, False)):
        with hf_fp8.set_default_dtype(torch.bfloat16 if bf16 else torch.float32):
            m = tiny_llama()
        t = hf_fp8.Trainer(model=m, args=_args(tmp_path, fp8="tensorwise", max_steps=1, **kw), train_dataset=_Data())
        t.create_optimizer()
        assert not isinstance(_inner(t.optimizer), AdamW), kw


def test_fp8_trainer_defers_the_update_to_the_next_forward_bit_identically(tmp_path):
    """--fp8_defer_step true (opt-in, with hf_fp8's AdamW): every update runs at the start of the
    next forward, the last one when train() returns; the same logged losses, weights and
    optimizer state as updates in optimizer.step(), and a checkpoint saved mid-run holds the
    updated weights."""
    runs = {}
    for defer in (True, False):
        with hf_fp8.set_default_dtype(torch.bfloat16):
            model = tiny_llama()
        args = _args(
            tmp_path / str(defer), fp8="delayed", fp8_auto_filter=False, max_steps=4, fp8_defer_step=defer,
            save_strategy="steps", save_steps=2,
        )  # fmt: skip
        trainer = hf_fp8.Trainer(model=model, args=args, train_dataset=_Data())
        trainer.train()
        opt = _inner(trainer.optimizer)
        assert opt.defer_step is defer and not opt.pending
        runs[defer] = (_losses(trainer), model.state_dict(), opt.state_dict()["state"])
    (l_d, sd_d, st_d), (l_e, sd_e, st_e) = runs[True], runs[False]
    assert l_d == l_e
    for name, t in sd_e.items():
        assert torch.equal(sd_d[name], t), name
    for i, s in st_e.items():
        assert torch.equal(st_d[i]["exp_avg"], s["exp_avg"]) and torch.equal(st_d[i]["exp_avg_sq"], s["exp_avg_sq"])
    from safetensors.torch import load_file

    mid_d = load_file(str(tmp_path / "True" / "checkpoint-2" / "model.safetensors"))
    mid_e = load_file(str(tmp_path / "False" / "checkpoint-2" / "model.safetensors"))
    for name, t in mid_e.items():
        assert torch.equal(mid_d[name], t), name
