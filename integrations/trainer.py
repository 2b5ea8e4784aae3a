"""The Trainer flag: ``TrainingArguments`` fields, a Trainer (and mixin), and a callback.

``--fp8 rowwise`` (or ``--full_bf16``) on the command line reaches the model through one
of three doors, all of which convert it inside ``Trainer.__init__``, before the optimizer is
created and before ``accelerator.prepare``:

- ``hf_fp8.Trainer`` (a ``transformers.Trainer``), or ``hf_fp8.Fp8TrainerMixin`` mixed into
  another Trainer class (TRL's ``SFTTrainer``...), which also builds
  :class:`hf_fp8.optim.AdamW`: with FP32 states in full-BF16 mode, and with torch's arithmetic
  and BF16 states in place of torch's AdamW for FP8 training of BF16 parameters
  (``--fp8_adamw``, on by default);
- the stock ``transformers.Trainer`` with ``callbacks=[hf_fp8.Fp8Callback()]``.

If FP8 arguments reach a Trainer through none of them, ``train()`` stops (when the Trainer
asks the arguments for its warm-up steps, before the first step) with an error saying what
to add, instead of silently training in BF16.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import warnings
from typing import Any

import torch
import transformers
from torch import nn

from hf_fp8.config import Fp8Config, Recipe
from hf_fp8.convert import convert
from hf_fp8.linear import Fp8Linear

__all__ = [
    "Fp8ArgumentsMixin",
    "Fp8Callback",
    "Fp8TrainerMixin",
    "Trainer",
    "TrainingArguments",
    "TrlLossWarning",
    "apply_to_model",
    "make_training_arguments_class",
]

_APPLIED = "_hf_fp8_applied"
_MONITORED = "_hf_fp8_monitored"  # a Trainer already runs the FP8 monitor: Fp8Callback must not add another
_GRAPHED = "_hf_fp8_graphed"  # a Trainer replaces its training step with hf_fp8.CudaGraphStep
_RESTORED = "_hf_fp8_restored"  # a Trainer restored the FP8 state from the checkpoint it resumed from


@dataclasses.dataclass
class Fp8ArgumentsMixin:
    """hf_fp8's fields for any ``TrainingArguments``-like dataclass (mix it in first)."""

    fp8: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "FP8 recipe: 'delayed' (hf_fp8's default), 'tensorwise', 'rowwise' or 'blockwise', the path of an Fp8Config "
            "JSON file, or 'none'."
        },
    )
    full_bf16: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Full-BF16 training: BF16 weights and gradients, FP32 RoPE, logits, loss and optimizer "
            "states (hf_fp8.optim.AdamW). Excludes --fp8. A model that a TRL trainer loads from a path is loaded in "
            "BF16 (model_init_kwargs dtype, float32 by TRL's default) unless model_init_kwargs sets a dtype."
        },
    )
    fp8_attention: bool = dataclasses.field(
        default=False,
        metadata={"help": "FP8 dot-product attention (attn_implementation='hf_fp8'; BF16 backward). Needs --fp8."},
    )
    fp8_auto_filter: bool | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Keep layers FP8 would slow down (and lm_head) in high precision. Default: the recipe's "
            "(Fp8Config.auto_filter: on, or what an --fp8 JSON file sets)."
        },
    )
    fp8_include: list[str] | None = dataclasses.field(
        default=None, metadata={"help": "Only convert modules whose name matches one of these shell patterns."}
    )
    fp8_exclude: list[str] | None = dataclasses.field(
        default=None, metadata={"help": "Never convert modules whose name matches one of these shell patterns."}
    )
    fp8_weights: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Store the converted layers' weights in FP8 only, frozen (LoRA / adapter fine-tuning): half the "
            "memory of BF16 base weights. Needs --fp8 tensorwise or delayed."
        },
    )
    fp8_save_weight_transpose: bool | None = dataclasses.field(
        default=None,
        metadata={
            "help": "true keeps each FP8 weight's transposed copy from the forward for the backward (one more "
            "byte per FP8 weight element alive, one launch less per layer); false re-casts it in the backward "
            "(the default of Fp8Config). Same results either way."
        },
    )
    fp8_keep_activations: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "With --gradient_checkpointing: 'auto' (Fp8Config's default) lets the last decoder layers keep "
            "their activations instead of recomputing them, as many as the memory of the gradients still to come "
            "holds (peak at or below full recompute's, same numbers bit for bit); 0 recomputes every layer "
            "(transformers' behaviour); N keeps the last N whatever they take."
        },
    )
    fp8_monitor_interval: int = dataclasses.field(
        default=0,
        metadata={
            "help": "FP8 health monitor (hf_fp8.monitor): every N optimizer steps, log each FP8 layer's input kurtosis, "
            "amax, saturated and flushed-to-zero fractions and scale as fp8/... metrics (report_to included) and to "
            "<output_dir>/fp8_monitor.jsonl. 0 (default) turns it off."
        },
    )
    fp8_adamw: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "With --fp8, --optim adamw_torch or adamw_torch_fused (the default), only BF16 trainable "
            "parameters and neither FSDP nor DeepSpeed, hf_fp8.Trainer builds hf_fp8.optim.AdamW with BF16 states "
            "and stochastic rounding of weights and moments instead: the memory of torch's AdamW (8 bytes per parameter "
            "with the gradient), but updates smaller than half a BF16 ulp survive in expectation instead of being "
            "rounded away (tests/test_bf16_updates.py: 50 steps at lr 2e-5, held-out loss -0.02% against an FP32-master "
            "run where torch's AdamW is +4.8%, with 16% of the weights ever moved). false keeps "
            "torch's AdamW (round to nearest); the stock Trainer with Fp8Callback needs it to train BF16 parameters "
            "with torch's AdamW."
        },
    )

    fp8_defer_step: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Opt-in. When hf_fp8.Trainer builds hf_fp8.optim.AdamW (--fp8_adamw, full-BF16): run each "
            "optimizer step's update at the start of the next training step or forward of the model "
            "(AdamW(defer_step=True)), so that the GPU has its kernels to run while the host launches the forward's "
            "first layers (about 1% of the step on an 8-layer Llama-3-8B-shaped model on the H100; the same "
            "numbers bit for bit). Until then the weights are one step old for anything that reads them another "
            "way: a callback reading a submodule, a submodule's state_dict(), copy.deepcopy(model). Off with "
            "--fp8_cuda_graph, --torch_compile, FSDP and DeepSpeed. false (the default) updates in optimizer.step()."
        },
    )
    fp8_strict_resume: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "A resumed run whose checkpoint lacks usable FP8 state (hf_fp8_state.safetensors missing, "
            "unreadable, or matching none of the model's delayed-scaling layers) stops with an error instead of "
            "warning and re-measuring the amax histories from the next step."
        },
    )
    fp8_cuda_graph: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Replay each training step's forward and backward as one CUDA graph (hf_fp8.CudaGraphStep): no "
            "kernel launched from Python during the step. Needs hf_fp8.Trainer (or Fp8TrainerMixin), a CUDA GPU, one "
            "process, batches of one shape (--dataloader_drop_last and a fixed sequence length) and "
            "--gradient_accumulation_steps 1; the model's own loss (no compute_loss override, no label smoothing); "
            "excludes --fp8_monitor_interval."
        },
    )

    def __post_init__(self) -> None:
        parent = super()
        if hasattr(parent, "__post_init__"):
            parent.__post_init__()
        self._validate_fp8()

    def _validate_fp8(self) -> None:
        if isinstance(self.fp8, str) and self.fp8.strip().lower() in ("none", "off", "no", "false", ""):
            self.fp8 = None  # --fp8 none: explicitly no FP8 (a script whose default is a recipe)
        if self.fp8 is not None and self.full_bf16:
            raise ValueError("--fp8 and --full_bf16 exclude each other: choose FP8 linear layers or full BF16")
        if self.fp8_weights and self.fp8 is None:
            raise ValueError("--fp8_weights needs --fp8 (tensorwise or delayed): it stores FP8 layers' weights in FP8")
        if self.fp8_attention and self.fp8 is None:
            raise ValueError("--fp8_attention needs --fp8 (a recipe for the linear layers)")
        if self.fp8_keep_activations is not None and self.fp8 is None and not self.full_bf16:
            raise ValueError(
                "--fp8_keep_activations needs --fp8 or --full_bf16: it sets how hf_fp8's converted model recomputes "
                "under --gradient_checkpointing"
            )
        interval = self.fp8_monitor_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
            raise ValueError(
                f"--fp8_monitor_interval: got {interval!r}; expected an int >= 0 (the FP8 health monitor samples every "
                "N optimizer steps; 0 turns it off)"
            )
        if (self.fp8 is not None or self.full_bf16) and getattr(self, "fp16", False):
            raise ValueError(
                "--fp16 cannot be combined with --fp8 or --full_bf16: FP16 autocast needs loss scaling and its range "
                "is too small for these recipes; use --bf16 (with --fp8, BF16 autocast runs everything that is not "
                "an FP8 layer) or nothing (full BF16)"
            )
        if self.fp8 is not None and os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower() == "fp8":
            raise ValueError(
                "--fp8 was given while ACCELERATE_MIXED_PRECISION=fp8 selects accelerate's own FP8 backend: two FP8 "
                "implementations would wrap the same layers. Unset ACCELERATE_MIXED_PRECISION (or set it to bf16)."
            )
        if self.fp8_cuda_graph:
            _validate_cuda_graph_arguments(self)
        self.fp8_config()  # a bad recipe name or JSON path fails here, at parse time

    def fp8_config(self) -> Fp8Config | None:
        """The :class:`Fp8Config` these arguments ask for (``None``: no hf_fp8)."""
        if self.full_bf16:
            keep = {} if self.fp8_keep_activations is None else {"keep_activations": self.fp8_keep_activations}
            return Fp8Config(recipe=None, **keep)
        if self.fp8 is None:
            return None
        # only what was given on the command line overrides a JSON config's fields
        overrides: dict[str, Any] = {}
        if self.fp8_auto_filter is not None:
            overrides["auto_filter"] = self.fp8_auto_filter
        if self.fp8_include:
            overrides["include"] = tuple(self.fp8_include)
        if self.fp8_exclude:
            overrides["exclude"] = tuple(self.fp8_exclude)
        if self.fp8_weights:
            overrides["fp8_weights"] = True
        if self.fp8_attention:
            overrides["fp8_attention"] = True
        if self.fp8_save_weight_transpose is not None:
            overrides["save_weight_transpose"] = self.fp8_save_weight_transpose
        if self.fp8_cuda_graph:  # the auto filter's thresholds for graph-replayed steps
            overrides["cuda_graph"] = True
        if self.fp8_keep_activations is not None:
            overrides["keep_activations"] = self.fp8_keep_activations
        if self.fp8.lower() in {r.value for r in Recipe}:
            return Fp8Config(recipe=self.fp8, **overrides)
        if os.path.isfile(self.fp8):
            return dataclasses.replace(Fp8Config.from_json(self.fp8), **overrides)
        raise ValueError(
            f"--fp8: got {self.fp8!r}; expected 'delayed', 'tensorwise', 'rowwise', 'blockwise', 'none' or the path of an Fp8Config "
            "JSON file"
        )

    def get_warmup_steps(self, num_training_steps: int) -> int:
        # The Trainer asks this while building the scheduler, before the first step: the last
        # moment to stop a run whose FP8 arguments were never applied to the model.
        if self.fp8_cuda_graph and not getattr(self, _GRAPHED, False):
            raise RuntimeError(
                "--fp8_cuda_graph reached a Trainer that does not replace its training step, so training would "
                "silently run eagerly. Use hf_fp8.Trainer or mix hf_fp8.Fp8TrainerMixin into your Trainer class "
                "(hf_fp8.Fp8Callback cannot replace the step)."
            )
        if self.fp8_config() is not None and not getattr(self, _APPLIED, False):
            raise RuntimeError(
                f"hf_fp8 arguments (fp8={self.fp8!r}, full_bf16={self.full_bf16}) reached a Trainer that did not apply "
                "them, so training would silently run without them. Use hf_fp8.Trainer, mix hf_fp8.Fp8TrainerMixin "
                "into your Trainer class, or pass callbacks=[hf_fp8.Fp8Callback()] to transformers.Trainer."
            )
        return super().get_warmup_steps(num_training_steps)


def _validate_cuda_graph_arguments(args: Any) -> None:
    """What a replayed step cannot honour, refused at parse time (hf_fp8.cuda_graph says why)."""
    if getattr(args, "gradient_accumulation_steps", 1) != 1:
        raise ValueError(
            "--fp8_cuda_graph needs --gradient_accumulation_steps 1: the graph writes each step's gradients, it "
            "cannot add micro-batches together; raise --per_device_train_batch_size instead"
        )
    if not getattr(args, "dataloader_drop_last", True):
        raise ValueError(
            "--fp8_cuda_graph needs --dataloader_drop_last: a graph replays one batch shape, and the last batch "
            "of an epoch is usually shorter"
        )
    if args.fp8_monitor_interval:
        raise ValueError(
            "--fp8_cuda_graph excludes --fp8_monitor_interval: the monitor decides in Python, at each step, whether "
            "to sample, and Python inside a captured forward runs only once"
        )
    if getattr(args, "label_smoothing_factor", 0.0):
        raise ValueError("--fp8_cuda_graph replays the model's own loss: --label_smoothing_factor is not applied there")


_MADE_CLASSES: dict[type, type] = {}


def make_training_arguments_class(base: type) -> type:
    """``hf_fp8``'s fields added to another arguments dataclass, e.g. TRL's ``SFTConfig``.

    The class is made once per ``base`` and registered in this module under its name
    (``Fp8SFTConfig``...), so that its instances pickle like any other arguments (the Trainer
    saves them with every checkpoint) and copy; a process that never called this function
    rebuilds the class from ``base`` when it unpickles them.
    """
    if not (isinstance(base, type) and dataclasses.is_dataclass(base)):
        raise TypeError(
            f"make_training_arguments_class: expected an arguments dataclass such as trl.SFTConfig, got {base!r}"
        )
    if issubclass(base, Fp8ArgumentsMixin):
        return base
    made = _MADE_CLASSES.get(base)
    if made is not None:
        return made
    name = f"Fp8{base.__name__}"
    taken = globals()
    if name in taken:  # another base of the same name (a user's own SFTConfig beside TRL's)
        name = next(f"{name}_{i}" for i in range(2, 10_000) if f"{name}_{i}" not in taken)
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"``{base.__module__}.{base.__qualname__}`` plus hf_fp8's fields (:class:`Fp8ArgumentsMixin`).",
        "__reduce__": lambda self: (_new_arguments_of, (base,), dict(self.__dict__)),
    }
    made = dataclasses.dataclass(type(name, (Fp8ArgumentsMixin, base), namespace))
    taken[name] = _MADE_CLASSES[base] = made
    return made


def _new_arguments_of(base: type):
    """An empty instance of ``make_training_arguments_class(base)``; pickle then restores its fields."""
    cls = make_training_arguments_class(base)
    return cls.__new__(cls)


def apply_to_model(model: nn.Module, config: Fp8Config, args: Any = None):
    """Convert ``model`` for ``config`` and mark ``args`` as applied. Returns the report."""
    report = convert(model, config)
    if args is not None:
        object.__setattr__(args, _APPLIED, True)
    return report


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _args_config(args: Any) -> Fp8Config | None:
    return args.fp8_config() if isinstance(args, Fp8ArgumentsMixin) else None


def _bind_trainer_init(cls: type, pargs: tuple, kwargs: dict) -> inspect.BoundArguments | None:
    """The call's arguments bound to the parameters of the ``__init__`` that
    :class:`Fp8TrainerMixin` hands them to: the first class after the mixin in ``cls``'s MRO
    whose ``__init__`` names ``args`` (TRL's DPO and KTO take ``ref_model`` second, GRPO and
    RLOO ``reward_funcs``; a pass-through ``__init__(*args, **kwargs)`` is looked through).
    None when they do not bind."""
    mro = cls.__mro__
    for klass in mro[mro.index(Fp8TrainerMixin) + 1 :]:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        try:
            signature = inspect.signature(init)
        except (TypeError, ValueError):
            continue
        params = signature.parameters
        if "args" in params and params["args"].kind in (
            params["args"].POSITIONAL_OR_KEYWORD,
            params["args"].KEYWORD_ONLY,
        ):
            try:
                return signature.bind(None, *pargs, **kwargs)  # None: self
            except TypeError:
                return None
    return None


def _load_in_bf16(args: Any) -> None:
    """Full-BF16 means BF16 parameters: a model the Trainer loads from a path (TRL's
    ``model_init_kwargs``, whose default dtype is float32) is loaded in BF16 unless the
    arguments chose a dtype."""
    if not hasattr(args, "model_init_kwargs"):
        return
    kwargs = dict(args.model_init_kwargs or {})
    if "dtype" not in kwargs and "torch_dtype" not in kwargs:
        kwargs["dtype"] = "bfloat16"
        args.model_init_kwargs = kwargs


class _CoverageLine(transformers.TrainerCallback):
    """Logs, after the first optimizer step, one line saying what ran in FP8 in it
    (:func:`hf_fp8.fp8_coverage`): a silent fallback shows as a count below the total. After the
    second, under activation checkpointing, what selective recompute chose (it measures in the first)."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and model is not None:
            from hf_fp8.coverage import reset_fp8_coverage

            reset_fp8_coverage(model)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1 and model is not None and getattr(args, "should_log", True):
            from hf_fp8.coverage import fp8_coverage

            coverage = fp8_coverage(model)
            if coverage.layers or coverage.attention:
                logging.getLogger("hf_fp8").warning("hf_fp8, step 1: %s", coverage.summary())
        if state.global_step == 2 and model is not None and getattr(args, "should_log", True):
            # selective recompute measures in step 1 and decides from step 2 on: say what it chose
            from hf_fp8.recompute import recompute_plans

            for plan in recompute_plans(model):
                if plan.last_checkpointed:
                    logging.getLogger("hf_fp8").warning(
                        "hf_fp8, step 2: activation checkpointing: %d/%d layers kept their activations, %d recomputed (%s)",
                        plan.last_kept, plan.last_checkpointed, plan.last_checkpointed - plan.last_kept, plan.last_reason,
                    )  # fmt: skip
        return control


class _ConvertAtInitEnd(transformers.TrainerCallback):
    """Converts the model the Trainer loaded itself, at the end of ``transformers.Trainer.__init__``."""

    def __init__(self, config: Fp8Config) -> None:
        self.config = config
        self.report = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self.report is None:
            self.report = apply_to_model(model, self.config, args)
        return control


def _note_trl_loss(model: nn.Module | None) -> None:
    """Say once that TRL computes the loss (its fused LM head), and where that bypasses FP8."""
    from hf_fp8.integrations.loss import causal_lm, trl_fused_lm_head

    if model is None or not trl_fused_lm_head(model):
        return
    lm = causal_lm(model)
    message = (
        "hf_fp8: this TRL trainer computes its loss itself, from the decoder's output through TRL's fused LM head "
        "(FP32 logits and log-probabilities in chunks, like hf_fp8's loss, which it replaces); hf_fp8's FP32 "
        "chunked loss serves the model's other calls."
    )
    if lm is not None and isinstance(getattr(lm, "lm_head", None), Fp8Linear):
        message += (
            " lm_head was converted to FP8, but TRL's head multiplies by lm_head.weight directly: it runs in the "
            "weight's dtype, not FP8."
        )
    warnings.warn(message, TrlLossWarning, stacklevel=3)


class TrlLossWarning(UserWarning):
    """A TRL trainer computes the loss itself (its fused LM head) instead of hf_fp8's FP32 loss."""


class Fp8TrainerMixin:
    """Mix into any ``transformers.Trainer`` subclass (first in the bases) to honour hf_fp8's arguments."""

    def __init__(self, *pargs, **kwargs) -> None:
        self.fp8_report = None
        self.fp8_ref_report = None
        self.fp8_monitor = None
        self._fp8_graph_step = None
        bound = _bind_trainer_init(type(self), pargs, kwargs)
        if bound is None:  # arguments the Trainer itself will refuse: let it say why
            super().__init__(*pargs, **kwargs)
            return
        model, args = bound.arguments.get("model"), bound.arguments.get("args")
        config = _args_config(args)
        init_end = None
        if config is not None:
            if isinstance(model, nn.Module):
                self.fp8_report = apply_to_model(model, config, args)
            elif model is not None:
                # a path or Hub id (TRL's idiom): the Trainer loads it; it is converted when the
                # Trainer's __init__ ends, before the optimizer exists, as Fp8Callback does
                if config.full_bf16:
                    _load_in_bf16(args)
                init_end = _ConvertAtInitEnd(config)
                bound.arguments["callbacks"] = [*(bound.arguments.get("callbacks") or ()), init_end]
        interval = args.fp8_monitor_interval if isinstance(args, Fp8ArgumentsMixin) else 0
        if interval:
            object.__setattr__(args, _MONITORED, True)  # before Fp8Callback.on_init_end can see args
        super().__init__(*bound.args[1:], **bound.kwargs)
        if init_end is not None:
            self.remove_callback(init_end)
            self.fp8_report = init_end.report
        if config is not None:
            self._fp8_convert_reference_model(config)
            _note_trl_loss(self.model)
            if not any(isinstance(c, (_CoverageLine, Fp8Callback)) for c in self.callback_handler.callbacks):
                self.add_callback(_CoverageLine())
        if interval:
            from hf_fp8.monitor.callback import Fp8MonitorCallback

            # first in the callback list, so that the report_to integrations receive its metrics
            self.fp8_monitor = Fp8MonitorCallback(interval).attach(self)
        if getattr(self.args, "fp8_cuda_graph", False):
            self._check_cuda_graph_trainer()
            object.__setattr__(self.args, _GRAPHED, True)

    def _fp8_convert_reference_model(self, config: Fp8Config) -> None:
        """TRL's DPO/KTO/GRPO reference model gets the policy's recipe: at the first step the two
        compute the same log-probabilities, so the implicit reward starts at zero rather than at
        the FP8 rounding noise of the policy against a BF16 reference. Its forwards run without
        grad, so they change no FP8 state (delayed scaling casts with its stored scales)."""
        ref = getattr(self, "ref_model", None)
        if not isinstance(ref, nn.Module) or ref is self.model:
            return
        if any(isinstance(m, Fp8Linear) for m in ref.modules()):
            return  # converted already (a copy of the converted policy, or converted by the caller)
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            warnings.warn(
                "hf_fp8: the reference model was already sharded by FSDP/DeepSpeed when hf_fp8 saw it, so it runs in "
                "its own dtype, not FP8 (pass it converted: hf_fp8.convert(ref_model, ...) before the Trainer)",
                stacklevel=3,
            )
            return
        self.fp8_ref_report = convert(ref, config)

    def _check_cuda_graph_trainer(self) -> None:
        if not _cuda_available():
            raise RuntimeError("--fp8_cuda_graph needs a CUDA GPU: CUDA graphs do not exist on this machine")
        if self.args.world_size > 1 or getattr(self.args, "deepspeed", None) or getattr(self.args, "fsdp", None):
            raise ValueError(
                "--fp8_cuda_graph runs in one process without DeepSpeed or FSDP: capturing their collectives "
                "is not supported here"
            )
        if type(self).compute_loss is not transformers.Trainer.compute_loss:
            raise ValueError(
                f"--fp8_cuda_graph replays the model's own forward and loss, but {type(self).__name__} overrides "
                "compute_loss, which the graph would skip; drop the flag for this Trainer"
            )

    def training_step(self, model, inputs, num_items_in_batch=None):
        """With ``--fp8_cuda_graph``: the forward and backward of ``model(**inputs)`` replayed as one
        CUDA graph (captured at the first step). ``num_items_in_batch`` is not passed: with one
        process and no gradient accumulation the model's mean loss is the same number."""
        if not getattr(self.args, "fp8_cuda_graph", False):
            self._flush_deferred_update()  # before compute_loss, whatever modules it calls
            return super().training_step(model, inputs, num_items_in_batch)
        from hf_fp8.cuda_graph import CudaGraphStep

        model.train()
        inputs = self._prepare_inputs(inputs)
        if self._fp8_graph_step is None or self._fp8_graph_step.model is not model:
            if "attention_mask" in inputs or "position_ids" in inputs:
                warnings.warn(
                    "--fp8_cuda_graph: the batches carry attention_mask/position_ids, so transformers builds an explicit "
                    "attention mask inside the graph (correct, but attention ran 3x slower on the H100 than SDPA's "
                    "causal path); leave them out of the batches when every row is one unpadded sequence",
                    stacklevel=2,
                )
            self._fp8_graph_step = CudaGraphStep(model)
        with self.compute_loss_context_manager():
            return self._fp8_graph_step(**inputs)

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        config = _args_config(self.args)
        if config is not None:
            self.fp8_report = apply_to_model(model, config, self.args)
        return model

    def _save_checkpoint(self, model, trial, *pargs, **kwargs):
        # the FP8 state first: a checkpoint that looks complete to transformers is complete for us
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from hf_fp8.state import save_fp8_state

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            save_fp8_state(self.accelerator.unwrap_model(self.model), folder)
        super()._save_checkpoint(model, trial, *pargs, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        from hf_fp8.state import load_fp8_state

        load_fp8_state(
            model if model is not None else self.model,
            resume_from_checkpoint,
            strict=getattr(self.args, "fp8_strict_resume", False),
        )
        object.__setattr__(self.args, _RESTORED, True)  # an Fp8Callback beside this Trainer has nothing to do

    def create_optimizer(self, *pargs, **kwargs):
        config = _args_config(self.args)
        if config is None or self.optimizer is not None:
            return super().create_optimizer(*pargs, **kwargs)
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if config.full_bf16:
            kind = dict(full_bf16=True)  # FP32 states, stochastic rounding
        elif (
            getattr(self.args, "fp8_adamw", False)
            and getattr(self.args.optim, "value", self.args.optim) in ("adamw_torch", "adamw_torch_fused")
            and not self.args.optim_args
            and not getattr(self, "is_fsdp_enabled", False)  # FSDP and DeepSpeed build or wrap their own
            and not getattr(self, "is_deepspeed_enabled", False)
            and params
            and all(p.dtype == torch.bfloat16 for _, p in params)
        ):  # fmt: skip
            # torch's memory (BF16 moments), but every update kept in expectation (see --fp8_adamw)
            kind = dict(state_dtype=torch.bfloat16, stochastic_rounding=True)
            transformers.utils.logging.get_logger(__name__).info(
                "hf_fp8: --fp8 with BF16 parameters: hf_fp8.optim.AdamW (BF16 states, stochastic rounding of weights "
                "and moments, one kernel per tensor) replaces torch's AdamW; --fp8_adamw false keeps torch's."
            )
        else:
            return super().create_optimizer(*pargs, **kwargs)
        from hf_fp8.optim import AdamW

        decay = set(self.get_decay_parameter_names(self.model))
        groups = [
            {"params": [p for n, p in params if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
        ]
        # the update at the next forward: not where that forward is a graph replay or compiled
        defer = (
            getattr(self.args, "fp8_defer_step", False)
            and not getattr(self.args, "fp8_cuda_graph", False)
            and not getattr(self.args, "torch_compile", False)
            and not getattr(self, "is_fsdp_enabled", False)  # FSDP gathers the weights in its own pre-hooks
            and not getattr(self, "is_deepspeed_enabled", False)
        )
        self.optimizer = AdamW(
            [g for g in groups if g["params"]],
            lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
            seed=self.args.seed,
            defer_step=defer,
            **kind,
        )
        if defer:
            self.optimizer.attach(self.model)
        return self.optimizer

    def _flush_deferred_update(self) -> None:
        flush = getattr(getattr(self.optimizer, "optimizer", self.optimizer), "flush", None)
        if flush is not None:
            flush()

    def train(self, *pargs, **kwargs):
        """``transformers.Trainer.train``, then the last deferred optimizer update (``--fp8_defer_step``):
        the model leaves ``train()`` with every step applied."""
        object.__setattr__(self.args, _RESTORED, False)  # set again by this run's resume, if any
        result = super().train(*pargs, **kwargs)
        self._flush_deferred_update()
        return result

    def evaluate(self, *pargs, **kwargs):
        self._flush_deferred_update()  # a compute_loss on submodules reads the updated weights
        return super().evaluate(*pargs, **kwargs)


class Fp8Callback(transformers.TrainerCallback):
    """For the stock ``transformers.Trainer``: ``callbacks=[hf_fp8.Fp8Callback()]``.

    Converts the model at the end of ``Trainer.__init__`` (before the optimizer exists and
    before ``accelerator.prepare``) using the arguments' hf_fp8 fields, or ``config`` if given.
    In full-BF16 mode the stock Trainer cannot build :class:`hf_fp8.optim.AdamW` itself: pass
    ``optimizers=(hf_fp8.optim.AdamW(model.parameters(), ...), None)`` or use ``hf_fp8.Trainer``;
    otherwise ``train()`` stops with an error. With ``--fp8`` and BF16 parameters the same holds for
    torch's AdamW (the stock Trainer's default), which rounds every update to nearest BF16 and so
    loses most fine-tuning updates: pass ``hf_fp8.optim.AdamW(model.parameters(), lr=...,
    state_dtype=torch.bfloat16)`` (the same memory, stochastic rounding), or accept nearest rounding
    explicitly with ``--fp8_adamw false`` or ``Fp8Callback(nearest_bf16_updates=True)``.

    With ``--fp8_monitor_interval N`` it also runs the FP8 health monitor
    (:class:`hf_fp8.monitor.Fp8MonitorCallback`); its metrics reach ``trainer.state.log_history``
    and ``fp8_monitor.jsonl``, but the stock Trainer calls its ``report_to`` integrations before
    this callback: for TensorBoard/W&B use ``hf_fp8.Trainer``, or
    ``hf_fp8.monitor.Fp8MonitorCallback(N).attach(trainer)`` instead of the flag.
    """

    def __init__(self, config: Fp8Config | None = None, *, nearest_bf16_updates: bool = False) -> None:
        self.config = config
        self.nearest_bf16_updates = nearest_bf16_updates
        self.report = None
        self.monitor = None
        self._coverage = _CoverageLine()

    def on_init_end(self, args, state, control, model=None, **kwargs):
        interval = getattr(args, "fp8_monitor_interval", 0)
        if interval and self.monitor is None and not getattr(args, _MONITORED, False):
            from hf_fp8.monitor.callback import Fp8MonitorCallback

            self.monitor = Fp8MonitorCallback(interval)
        config = self.config or _args_config(args)
        if config is None or model is None:
            return control
        self.report = apply_to_model(model, config, args)
        return control

    def _save_state(self, args, state, model) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from hf_fp8.state import save_fp8_state

        if model is not None and args.should_save:
            save_fp8_state(model, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # the Trainer saves right after this step's callbacks: write the FP8 state before its files,
        # so a checkpoint that looks complete to transformers is complete for us (on_save writes it
        # again after an evaluation that ran in between)
        if control.should_save:
            self._save_state(args, state, model)
        self._coverage.on_step_end(args, state, control, model=model, **kwargs)
        return self._monitor_event("on_step_end", args, state, control, model=model, **kwargs)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if control.should_save:
            self._save_state(args, state, model)
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        self._save_state(args, state, model)
        return control

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        if state.global_step > 0 and model is not None and not getattr(args, _RESTORED, False):
            self._restore_state(args, state, model)  # resumed: the FP8 state saved with the checkpoint
        config = self.config or _args_config(args)
        from hf_fp8.optim import AdamW

        inner = getattr(optimizer, "optimizer", optimizer)
        if config is not None and config.full_bf16:
            if not isinstance(inner, AdamW):
                raise RuntimeError(
                    "full-BF16 training needs FP32 optimizer states: pass optimizers=(hf_fp8.optim.AdamW("
                    "model.parameters(), lr=..., full_bf16=True), None) to transformers.Trainer, or use hf_fp8.Trainer"
                )
        elif (
            config is not None
            and isinstance(inner, torch.optim.Optimizer)
            and not isinstance(inner, AdamW)
            and not self.nearest_bf16_updates
            and getattr(args, "fp8_adamw", True)
            and any(p.dtype == torch.bfloat16 and p.requires_grad for g in inner.param_groups for p in g["params"])
        ):
            raise RuntimeError(
                f"{type(inner).__name__} updates the model's BF16 parameters by rounding to nearest: at fine-tuning "
                "learning rates most updates are smaller than half a BF16 ulp and are lost (hf_fp8's CPU test: "
                "torch's AdamW moved a few % of the weights and ended far from an FP32-master run). Pass "
                "optimizers=(hf_fp8.optim.AdamW(model.parameters(), lr=..., state_dtype=torch.bfloat16), None) to "
                "transformers.Trainer (the same memory, stochastic rounding), or use hf_fp8.Trainer (it builds that "
                "optimizer). To keep it anyway: --fp8_adamw false, or Fp8Callback(nearest_bf16_updates=True)."
            )
        if config is not None and not getattr(self, "_trl_noted", False):
            self._trl_noted = True
            _note_trl_loss(model)
        if model is not None and optimizer is not None and getattr(self, "_amax_sync", None) is None:
            from hf_fp8.distributed import attach_amax_sync

            # delayed recipe, several processes: one all-reduce of the newest amaxes per optimizer step
            self._amax_sync = attach_amax_sync(optimizer, model)
        return self._monitor_event("on_train_begin", args, state, control, optimizer=optimizer, model=model, **kwargs)

    def _restore_state(self, args, state, model) -> None:
        """The stock Trainer does not tell callbacks which checkpoint it resumed from: the
        candidates (``args.resume_from_checkpoint``, then ``output_dir/checkpoint-<step>``) are
        checked against the Trainer state it loaded (step, log history and FLOs), so that another
        run's checkpoint of the same number never supplies the FP8 state."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from hf_fp8.state import Fp8StateError, Fp8StateWarning, load_fp8_state

        strict = getattr(args, "fp8_strict_resume", False)
        candidates = []
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.append(args.resume_from_checkpoint)
        candidates.append(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        for folder in candidates:
            if _trainer_state_matches(folder, state):
                load_fp8_state(model, folder, strict=strict)
                return
        message = (
            f"hf_fp8.Fp8Callback: resumed at step {state.global_step}, but none of {candidates} holds the Trainer "
            "state that was loaded, and the stock transformers.Trainer does not tell callbacks which checkpoint it "
            "resumed from: the FP8 state (amax histories and scales) starts afresh. Use hf_fp8.Trainer (it knows), "
            "or set TrainingArguments(resume_from_checkpoint=<that folder>)."
        )
        if strict:
            raise Fp8StateError(message)
        warnings.warn(message, Fp8StateWarning, stacklevel=2)

    # ---- the FP8 monitor (--fp8_monitor_interval), forwarded -------------------------------
    def _monitor_event(self, event: str, args, state, control, **kwargs):
        if self.monitor is not None:
            getattr(self.monitor, event)(args, state, control, **kwargs)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self._coverage.on_step_begin(args, state, control, **kwargs)
        return self._monitor_event("on_step_begin", args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        return self._monitor_event("on_log", args, state, control, logs=logs, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        return self._monitor_event("on_train_end", args, state, control, **kwargs)


def _trainer_state_matches(folder: str, state) -> bool:
    """Whether ``folder`` is the checkpoint the Trainer state ``state`` was loaded from."""
    import json

    path = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    return (
        saved.get("global_step") == state.global_step
        and saved.get("log_history") == state.log_history
        and saved.get("total_flos") == state.total_flos
    )


@dataclasses.dataclass
class TrainingArguments(Fp8ArgumentsMixin, transformers.TrainingArguments):
    """``transformers.TrainingArguments`` plus ``--fp8``, ``--full_bf16``, ``--fp8_attention``,
    ``--fp8_auto_filter``, ``--fp8_include``, ``--fp8_exclude``, ``--fp8_weights``, ``--fp8_save_weight_transpose``,
    ``--fp8_keep_activations``, ``--fp8_monitor_interval`` and ``--fp8_cuda_graph`` (see :class:`Fp8ArgumentsMixin`)."""


class Trainer(Fp8TrainerMixin, transformers.Trainer):
    """A drop-in ``transformers.Trainer`` that applies hf_fp8's arguments (see the module docstring)."""
