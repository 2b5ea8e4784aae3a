"""TRL's trainers with hf_fp8: SFT (packed and padding-free), DPO, GRPO, KTO and RLOO through
:class:`hf_fp8.Fp8TrainerMixin` and :class:`hf_fp8.Fp8Callback`, with the model given as a
path (TRL's idiom); argument classes that pickle; checkpoints that resume; TRL's own loss.

Tiny Llama and tokenizer built in code and saved to a temporary folder; nothing is downloaded."""

from __future__ import annotations

import copy
import math
import pickle
import subprocess
import sys
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from llama_fixtures import tiny_llama  # noqa: E402

import hf_fp8  # noqa: E402
from hf_fp8.integrations.trainer import TrlLossWarning, make_training_arguments_class  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog while a small cat sleeps in the warm sun"


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([TEXT] * 4, trainers.BpeTrainer(vocab_size=300))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A BF16 tiny Llama and its tokenizer in a folder, as a Hub checkpoint would be."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(seed=0, attn_implementation="sdpa").to(torch.bfloat16).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return str(path)


def _trainer_class(base):
    return type(f"Fp8{base.__name__}", (hf_fp8.Fp8TrainerMixin, base), {})


def _common(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        fp8="delayed",
        fp8_auto_filter=False,  # tiny layers: the filter would keep them all in BF16
        fp8_exclude=["*lm_head"],
    )
    base.update(kw)
    return base


def _words(n, seed):
    g = torch.Generator().manual_seed(seed)
    words = TEXT.split()
    return [" ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g).tolist())]


def _sft_data(n=16):
    return datasets.Dataset.from_dict({"text": [_words(6 + i % 5, i)[0] for i in range(n)]})


def _preference_data(n=16):
    return datasets.Dataset.from_dict(
        {
            "prompt": [_words(3, i)[0] for i in range(n)],
            "chosen": [" " + _words(4, 100 + i)[0] for i in range(n)],
            "rejected": [" " + _words(4, 200 + i)[0] for i in range(n)],
        }
    )


def _prompt_data(n=16):
    return datasets.Dataset.from_dict({"prompt": [_words(3, i)[0] for i in range(n)]})


def _length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _fp8_layers(model):
    return [m for m in model.modules() if isinstance(m, hf_fp8.Fp8Linear)]


def _fp8_state(model):
    return {n: b.clone() for n, b in model.named_buffers() if "fp8_amax_history" in n or "fp8_scale" in n}


def _build(kind, config_cls, tmp_path, model_path, **kw):
    """(trainer class, its keyword arguments) for each TRL trainer, the model given as a path."""
    if kind == "sft":
        args = config_cls(**_common(tmp_path, **{"max_length": 32, **kw}))
        return trl.SFTTrainer, dict(model=model_path, args=args, train_dataset=_sft_data())
    if kind in ("dpo", "kto"):
        data = _preference_data()
        if kind == "kto":
            prompt, chosen, rejected = (list(data[c]) for c in ("prompt", "chosen", "rejected"))
            data = datasets.Dataset.from_dict(
                {
                    "prompt": prompt * 2,
                    "completion": chosen + rejected,
                    "label": [True] * len(chosen) + [False] * len(rejected),
                }
            )
        args = config_cls(**_common(tmp_path, max_length=32, **kw))
        cls = trl.DPOTrainer if kind == "dpo" else trl.KTOTrainer
        return cls, dict(model=model_path, args=args, train_dataset=data)
    # grpo / rloo: generation, then the policy loss
    args = config_cls(**_common(tmp_path, max_completion_length=6, num_generations=2, generation_batch_size=2, **kw))
    cls = trl.GRPOTrainer if kind == "grpo" else trl.RLOOTrainer
    return cls, dict(model=model_path, reward_funcs=_length_reward, args=args, train_dataset=_prompt_data())


_CONFIGS = {"sft": "SFTConfig", "dpo": "DPOConfig", "kto": "KTOConfig", "grpo": "GRPOConfig", "rloo": "RLOOConfig"}


def _make(kind, tmp_path, model_path, *, positional=False, **kw):
    config_cls = make_training_arguments_class(getattr(trl, _CONFIGS[kind]))
    base, kwargs = _build(kind, config_cls, tmp_path, model_path, **kw)
    kwargs["processing_class"] = _tokenizer()
    cls = _trainer_class(base)
    if positional:  # TRL's own order: DPO/KTO take ref_model second, GRPO/RLOO reward_funcs
        model = kwargs.pop("model")
        if kind in ("grpo", "rloo"):
            return cls(model, kwargs.pop("reward_funcs"), kwargs.pop("args"), **kwargs)
        if kind in ("dpo", "kto"):
            return cls(model, None, kwargs.pop("args"), **kwargs)
        return cls(model, kwargs.pop("args"), **kwargs)
    return cls(**kwargs)


# ---- argument classes -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(_CONFIGS.values()))
def test_argument_classes_pickle_copy_and_are_made_once(tmp_path, name):
    base = getattr(trl, name)
    cls = make_training_arguments_class(base)
    assert make_training_arguments_class(base) is cls and make_training_arguments_class(cls) is cls
    args = cls(output_dir=str(tmp_path), fp8="rowwise", fp8_exclude=["*.v_proj"], report_to="none", use_cpu=True)
    for clone in (pickle.loads(pickle.dumps(args)), copy.deepcopy(args), copy.copy(args)):
        assert type(clone) is cls
        assert clone.fp8 == "rowwise" and clone.fp8_exclude == ["*.v_proj"] and clone.output_dir == args.output_dir
        assert clone.fp8_config() == args.fp8_config()
    pickle.dumps(cls)  # the class itself, by reference


def test_argument_classes_unpickle_in_a_fresh_process(tmp_path):
    """A process that never made the class (torch.load of a checkpoint's training_args.bin) rebuilds it."""
    cls = make_training_arguments_class(trl.SFTConfig)
    path = tmp_path / "args.pkl"
    path.write_bytes(pickle.dumps(cls(output_dir=str(tmp_path), fp8="delayed", report_to="none", use_cpu=True)))
    code = (
        "import pickle, sys; a = pickle.loads(open(sys.argv[1], 'rb').read()); "
        "print(type(a).__name__, a.fp8, a.fp8_config().recipe.value)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Fp8SFTConfig", "delayed", "delayed"]


def test_make_training_arguments_class_refuses_what_is_not_an_arguments_dataclass():
    with pytest.raises(TypeError, match="arguments dataclass"):
        make_training_arguments_class(trl.SFTTrainer)


# ---- each trainer: a few FP8 steps from a path, a checkpoint, a resume --------------------------
@pytest.mark.parametrize(
    "kind, kw",
    [
        ("sft", dict(packing=True)),  # packed without padding (position_ids restart per sequence)
        ("sft", dict(padding_free=True, max_length=None)),  # (TRL: unpacked padding-free does not truncate)
        # BF16 parameters: hf_fp8's AdamW with stochastic rounding (TRL loads float32 by default)
        ("sft", dict(packing=True, model_init_kwargs={"dtype": "bfloat16"})),
        ("dpo", {}),
        ("grpo", {}),
    ],
    ids=["sft-packing", "sft-padding-free", "sft-bf16-params", "dpo", "grpo"],
)
def test_trainer_runs_fp8_saves_and_resumes_exactly(tmp_path, model_path, kind, kw):
    trainer = _make(kind, tmp_path, model_path, **kw)
    assert trainer.fp8_report is not None and trainer.fp8_report.converted
    assert trainer.args.fp8 == "delayed"  # the user's arguments, not a default config
    layers = _fp8_layers(trainer.model)
    assert layers and all(m.fp8_config.recipe is hf_fp8.Recipe.DELAYED for m in layers)
    trainer.train()
    if "model_init_kwargs" in kw:
        from hf_fp8.optim import AdamW

        assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), AdamW)
    losses = _losses(trainer)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    state = _fp8_state(trainer.model)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "hf_fp8_state.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoint-3" / "training_args.bin").is_file()  # the arguments pickled

    resumed = _make(kind, tmp_path, model_path, **kw)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    # the resumed run's last step is the uninterrupted run's, bit for bit, FP8 state included
    assert _losses(resumed)[-1] == losses[-1]
    after = _fp8_state(resumed.model)
    assert after.keys() == state.keys()
    for name in state:
        assert torch.equal(after[name], state[name]), name


def test_dpo_reference_model_gets_the_policy_recipe(tmp_path, model_path):
    """TRL reloads the reference from the policy's path; hf_fp8 converts it with the same recipe,
    so the first step's implicit reward is zero and the loss is exactly log 2."""
    trainer = _make("dpo", tmp_path, model_path, max_steps=1, save_strategy="no")
    assert trainer.ref_model is not None and trainer.fp8_ref_report is not None
    assert len(_fp8_layers(trainer.ref_model)) == len(_fp8_layers(trainer.model))
    before = _fp8_state(trainer.ref_model)
    trainer.train()
    assert _losses(trainer)[0] == pytest.approx(math.log(2), abs=1e-6)
    after = _fp8_state(trainer.ref_model)  # its forwards run without grad: no FP8 state changes
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("kind", ["dpo", "kto", "grpo", "rloo"])
def test_positional_arguments_in_trl_order_reach_the_right_parameters(tmp_path, model_path, kind):
    """DPO and KTO take ref_model second, GRPO and RLOO reward_funcs: the mixin binds the call to
    the trainer's own signature instead of assuming (model, args)."""
    trainer = _make(kind, tmp_path, model_path, positional=True, max_steps=2, save_strategy="no")
    assert trainer.args.fp8 == "delayed" and trainer.fp8_report.converted
    trainer.train()
    assert len(_losses(trainer)) == 2 and all(math.isfinite(v) for v in _losses(trainer))


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_full_bf16_through_trl(tmp_path, model_path, kind):
    from hf_fp8.optim import AdamW

    trainer = _make(kind, tmp_path, model_path, fp8=None, full_bf16=True, bf16=False, save_strategy="no")
    assert not _fp8_layers(trainer.model)
    # TRL loads float32 unless told otherwise: full-BF16 loads the path in BF16 (the reference too)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    if kind == "dpo":
        assert {p.dtype for p in trainer.ref_model.parameters()} == {torch.bfloat16}
    trainer.train()
    assert isinstance(
        trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer, AdamW
    )
    assert all(math.isfinite(v) for v in _losses(trainer))


def test_model_given_as_a_path_with_lora(tmp_path, model_path):
    peft = pytest.importorskip("peft")
    config_cls = make_training_arguments_class(trl.SFTConfig)
    args = config_cls(**_common(tmp_path, max_length=32, save_strategy="no", max_steps=2))
    trainer = _trainer_class(trl.SFTTrainer)(
        model=model_path,
        args=args,
        train_dataset=_sft_data(),
        processing_class=_tokenizer(),
        peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    assert trainer.fp8_report.converted and not any(".lora_" in n for n in trainer.fp8_report.converted)
    trainer.train()
    assert all(math.isfinite(v) for v in _losses(trainer))


# ---- the stock TRL trainers with Fp8Callback -----------------------------------------------------
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_callback_with_stock_trl_trainers(tmp_path, model_path, kind):
    config_cls = make_training_arguments_class(getattr(trl, _CONFIGS[kind]))
    base, kwargs = _build(kind, config_cls, tmp_path, model_path, fp8="rowwise", save_strategy="no")
    trainer = base(**kwargs, processing_class=_tokenizer(), callbacks=[hf_fp8.Fp8Callback(nearest_bf16_updates=True)])
    assert _fp8_layers(trainer.model)
    trainer.train()
    assert all(math.isfinite(v) for v in _losses(trainer))


def test_stock_trl_trainer_without_hf_fp8_refuses_fp8_arguments(tmp_path, model_path):
    """The guard: FP8 arguments that reached a DPOTrainer with neither the mixin nor the callback."""
    config_cls = make_training_arguments_class(trl.DPOConfig)
    base, kwargs = _build("dpo", config_cls, tmp_path, model_path, save_strategy="no")
    trainer = base(**kwargs, processing_class=_tokenizer())
    with pytest.raises(RuntimeError, match="did not apply them"):
        trainer.train()


# ---- TRL's loss ------------------------------------------------------------------------------
def test_trl_loss_is_announced_once_and_matches_the_fp32_chunked_loss(tmp_path, model_path):
    """TRL's SFT/DPO/GRPO compute their losses through TRL's fused LM head, not the model's loss:
    hf_fp8 says so (once per trainer), and TRL's head gives the FP32 chunked loss's number."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _make("sft", tmp_path, model_path, save_strategy="no")
    notes = [w for w in caught if issubclass(w.category, TrlLossWarning)]
    assert len(notes) == 1 and "fused LM head" in str(notes[0].message)

    model = trainer.model
    ids = trainer.processing_class([TEXT], return_tensors="pt")["input_ids"]
    model.train()
    with torch.no_grad():
        ours = model(input_ids=ids, labels=ids).loss  # hf_fp8's FP32 chunked loss (TRL passes through)
        theirs = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
    # both: the same BF16 hidden states and lm_head weight, FP32 logits, FP32 log-softmax; only
    # the order of the FP32 sums differs (a few ulps of a ~6.2 loss)
    assert ours.dtype == theirs.dtype == torch.float32
    assert theirs.item() == pytest.approx(ours.item(), rel=1e-5)


def test_trl_note_mentions_an_fp8_lm_head(tmp_path, model_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _make("sft", tmp_path, model_path, fp8_exclude=None, fp8_include=["*lm_head", "model.*"], save_strategy="no")
    notes = [str(w.message) for w in caught if issubclass(w.category, TrlLossWarning)]
    assert len(notes) == 1 and "lm_head was converted to FP8" in notes[0]
