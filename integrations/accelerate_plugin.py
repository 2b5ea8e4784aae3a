"""accelerate: one line, ``accelerator = hf_fp8.Accelerator()``, and the recipe comes from the launch.

accelerate has no plugin registry (its kwargs handlers are a closed dict keyed by exact
class), so hf_fp8 ships an ``accelerate.Accelerator`` subclass that converts every model it
``prepare()``s. The recipe is read, in order, from the ``fp8_config`` argument, from
``HF_FP8_RECIPE`` (``tensorwise``, ``rowwise``, ``delayed``, ``full_bf16``, or the path of an
``Fp8Config`` JSON; ``HF_FP8_AUTO_FILTER=0`` also converts the layers the size filter would keep),
or from accelerate's own FP8 launch settings
(``ACCELERATE_MIXED_PRECISION=fp8`` with ``ACCELERATE_FP8_FORMAT``/``_AMAX_HISTORY_LEN``/
``_AMAX_COMPUTE_ALGO``/``_MARGIN``, as ``accelerate launch`` sets them from a yaml's
``fp8_config``), translated to the closest hf_fp8 recipe. In every case accelerate's own FP8
backends are turned off (mixed precision becomes ``bf16``: BF16 autocast for what is not an
FP8 layer), so nothing re-wraps hf_fp8's layers. Converting inside ``prepare`` after the
optimizer exists is fine: ``convert`` keeps the same ``nn.Parameter`` objects.

Several processes: the delayed recipe's amax histories are all-reduced once per optimizer step
(:mod:`hf_fp8.distributed`). On CPUs, where accelerate ignores an FSDP launch config and falls
back to DDP, an ``fsdp_version: 2`` config is honoured here: ``prepare`` applies ``fully_shard``
(over gloo) to the layers the config names and to the model, and points the optimizer at the
sharded parameters. On GPUs accelerate's own FSDP2 path runs, after hf_fp8 has converted the
model (the FP8 layers are ordinary ``nn.Linear`` subclasses; FSDP2 all-gathers their BF16
weights before each forward, so their scales come from full tensors).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import accelerate
import torch
from torch import nn

from hf_fp8.config import Fp8Config, Recipe

__all__ = ["Accelerator", "config_from_environment"]

logger = logging.getLogger(__name__)


_FP8_FORMATS = {"HYBRID": "e5m2", "E4M3": "e4m3"}  # accelerate's names -> the gradients' format


def _env_int(env, name: str, default: int) -> int:
    value = env.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer (e.g. {name}={default})") from None


def config_from_environment(environ: dict[str, str] | None = None) -> Fp8Config | None:
    """The recipe the launch asks for (see the module docstring); ``None`` if it asks for none.

    Raises:
        ValueError: a variable that names no recipe, format or number."""
    env = os.environ if environ is None else environ
    config = _recipe_from_environment(env)
    auto_filter = env.get("HF_FP8_AUTO_FILTER", "").strip().lower()
    if config is None or not auto_filter:
        return config
    if auto_filter not in ("0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"HF_FP8_AUTO_FILTER={env['HF_FP8_AUTO_FILTER']!r}: expected 0 or 1")
    return dataclasses.replace(config, auto_filter=auto_filter in ("1", "true", "yes"))


def _recipe_from_environment(env) -> Fp8Config | None:
    recipe = env.get("HF_FP8_RECIPE", "").strip()
    if recipe:
        if recipe.lower() in ("full_bf16", "full-bf16", "none"):
            return Fp8Config(recipe=None)
        if recipe.lower() in {r.value for r in Recipe}:
            return Fp8Config(recipe=recipe)
        if os.path.isfile(recipe):
            return Fp8Config.from_json(recipe)
        raise ValueError(
            f"HF_FP8_RECIPE={recipe!r}: expected tensorwise, rowwise, delayed, blockwise, full_bf16 or the path of an Fp8Config JSON"
        )
    if env.get("ACCELERATE_MIXED_PRECISION", "").lower() == "fp8":
        fmt = env.get("ACCELERATE_FP8_FORMAT", "HYBRID").upper()
        if fmt not in _FP8_FORMATS:
            raise ValueError(
                f"ACCELERATE_FP8_FORMAT={env['ACCELERATE_FP8_FORMAT']!r}: expected one of {sorted(_FP8_FORMATS)} "
                "(HYBRID: E4M3 forward, E5M2 gradients; E4M3: E4M3 everywhere)"
            )
        kw: dict = {"grad_format": _FP8_FORMATS[fmt]}
        if "ACCELERATE_FP8_AMAX_HISTORY_LEN" in env or "ACCELERATE_FP8_AMAX_COMPUTE_ALGO" in env:
            kw["recipe"] = "delayed"
            kw["amax_history_len"] = _env_int(env, "ACCELERATE_FP8_AMAX_HISTORY_LEN", 16)
            kw["amax_compute_algo"] = env.get("ACCELERATE_FP8_AMAX_COMPUTE_ALGO", "max").lower()
            kw["margin"] = _env_int(env, "ACCELERATE_FP8_MARGIN", 0)
        else:
            kw["recipe"] = "tensorwise"
        return Fp8Config(**kw)
    return None


def _fp8_environment(handlers) -> dict[str, str]:
    """What ``accelerate launch`` would put in the environment for ``mixed_precision="fp8"`` and
    these kwargs handlers (a ``TERecipeKwargs``' format, history length, algorithm and margin)."""
    env = {"ACCELERATE_MIXED_PRECISION": "fp8"}
    for h in handlers:
        if type(h).__name__ != "TERecipeKwargs":
            continue
        for field, var in (
            ("fp8_format", "ACCELERATE_FP8_FORMAT"),
            ("amax_history_len", "ACCELERATE_FP8_AMAX_HISTORY_LEN"),
            ("amax_compute_algo", "ACCELERATE_FP8_AMAX_COMPUTE_ALGO"),
            ("margin", "ACCELERATE_FP8_MARGIN"),
        ):
            value = getattr(h, field, None)
            if value is not None:
                env[var] = str(value)
    return env


def _warn_nearest_bf16_optimizers(objects) -> None:
    """An optimizer that rounds BF16 weights to nearest (torch's) loses the updates smaller than
    half a BF16 ulp, most of them at fine-tuning learning rates: say so, and what keeps them."""
    import warnings

    from hf_fp8.optim import AdamW

    for opt in objects:
        inner = getattr(opt, "optimizer", opt)
        if not isinstance(inner, torch.optim.Optimizer) or isinstance(inner, AdamW):
            continue
        if any(p.dtype == torch.bfloat16 and p.requires_grad for g in inner.param_groups for p in g["params"]):
            warnings.warn(
                f"hf_fp8.Accelerator: {type(inner).__name__} rounds every update of the BF16 parameters to nearest; "
                "at fine-tuning learning rates most updates are smaller than half a BF16 ulp and are lost. "
                "hf_fp8.optim.AdamW(model.parameters(), lr=..., state_dtype=torch.bfloat16) takes the same memory "
                "and keeps them (stochastic rounding); FP32 parameters keep them too.",
                UserWarning,
                stacklevel=3,
            )


class Accelerator(accelerate.Accelerator):
    """An ``accelerate.Accelerator`` whose ``prepare()`` converts models with hf_fp8.

    Args:
        fp8_config (`Fp8Config` or `str`, *optional*): the recipe; default from the environment
            (see the module docstring). With none found it behaves exactly like ``accelerate.Accelerator``.
        *args, **kwargs: ``accelerate.Accelerator``'s.
    """

    def __init__(self, *args, fp8_config: Fp8Config | str | None = None, **kwargs) -> None:
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # a multi-process launch on a machine without GPUs: train on CPUs over gloo (stock
            # accelerate would otherwise leave each process alone, never syncing gradients)
            kwargs.setdefault("cpu", True)
        if isinstance(fp8_config, str):
            fp8_config = Fp8Config(recipe=fp8_config)
        config = fp8_config or config_from_environment()
        if config is None and kwargs.get("mixed_precision") == "fp8":
            # mixed_precision="fp8" in code: the launch route's translation, with a TERecipeKwargs
            # handler's settings where one is given (accelerate's own check would otherwise ask
            # for TransformerEngine or torchao)
            config = config_from_environment(_fp8_environment(kwargs.get("kwargs_handlers") or []))
        if config is not None:
            requested = kwargs.get("mixed_precision") or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
            if requested == "fp16":
                raise ValueError("hf_fp8.Accelerator: mixed_precision='fp16' cannot be combined with hf_fp8; use bf16")
            # accelerate's FP8 backends must not wrap our layers: BF16 autocast runs the rest instead.
            # Full BF16 needs no autocast (the parameters are BF16 already).
            mixed = "no" if config.full_bf16 else {"fp8": "bf16"}.get(requested, requested)
            if requested == "fp8":
                logger.info("hf_fp8.Accelerator: accelerate's own FP8 is replaced by hf_fp8 (%s)", config.short_str())
            kwargs["mixed_precision"] = mixed
            os.environ["ACCELERATE_MIXED_PRECISION"] = mixed
            handlers = kwargs.get("kwargs_handlers") or []
            kept = [h for h in handlers if "Recipe" not in type(h).__name__]
            if len(kept) != len(handlers):
                logger.warning("hf_fp8.Accelerator: dropped accelerate FP8 recipe handlers; hf_fp8 does FP8 here")
            kwargs["kwargs_handlers"] = kept
        super().__init__(*args, **kwargs)
        self.fp8_config = config
        self.fp8_reports: list = []
        self._fp8_amax_syncs: list = []

    def _fsdp2_on_cpu(self) -> bool:
        """accelerate ignores an FSDP launch config on CPUs and falls back to DDP (its FSDP code
        paths assume CUDA); with ``fsdp_version: 2`` hf_fp8 applies ``fully_shard`` itself there."""
        return (
            os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and os.environ.get("FSDP_VERSION") == "2"
            and self.distributed_type == accelerate.DistributedType.MULTI_CPU
        )

    def _shard_on_cpu(self, model: nn.Module, optimizers: list) -> None:
        """``fully_shard`` each layer named by ``FSDP_TRANSFORMER_CLS_TO_WRAP``, then the root, over
        a gloo device mesh; point the optimizers at the sharded parameters (FSDP2 replaces them)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        wrap = {c.strip() for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()}
        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"
        before = {id(p): name for name, p in model.named_parameters()}
        mesh = init_device_mesh("cpu", (self.num_processes,))
        for module in list(model.modules()):
            if type(module).__name__ in wrap:
                fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        after = dict(model.named_parameters())
        for opt in optimizers:
            for group in opt.param_groups:
                group["params"] = [after[before[id(p)]] if id(p) in before else p for p in group["params"]]
        logger.info("hf_fp8.Accelerator: FSDP2 applied on CPU (%d processes, wrapping %s)", self.num_processes, wrap)

    def prepare(self, *args, **kwargs):
        if self.fp8_config is not None:
            _warn_nearest_bf16_optimizers(args)
            from hf_fp8.convert import convert
            from hf_fp8.linear import Fp8Linear

            for obj in args:
                if isinstance(obj, nn.Module) and not any(isinstance(m, Fp8Linear) for m in obj.modules()):
                    report = convert(obj, self.fp8_config)
                    self.fp8_reports.append(report)
                    if self.is_main_process:
                        print(report, flush=True)
        if self._fsdp2_on_cpu():
            models = [o for o in args if isinstance(o, nn.Module)]
            optimizers = [o for o in args if isinstance(o, torch.optim.Optimizer)]
            for model in models:
                self._shard_on_cpu(model, optimizers)
                if self.mixed_precision == "bf16":  # what accelerate's prepare_model would add
                    import types

                    forward = model.forward.__func__
                    model.forward = types.MethodType(torch.autocast("cpu", dtype=torch.bfloat16)(forward), model)
                self._models.append(model)
            others = [o for o in args if not isinstance(o, nn.Module)]
            done = super().prepare(*others, **kwargs) if others else ()
            done = iter(done if isinstance(done, tuple) else (done,))
            prepared = tuple(o if isinstance(o, nn.Module) else next(done) for o in args)
            prepared = prepared[0] if len(prepared) == 1 else prepared
        else:
            prepared = super().prepare(*args, **kwargs)
        if self.fp8_config is not None and self.num_processes > 1:
            from hf_fp8.distributed import attach_amax_sync

            # delayed recipe: every rank derives its scales from the same (all-reduced) amax history
            outs = prepared if isinstance(prepared, tuple) else (prepared,)
            models = [o for o in outs if isinstance(o, nn.Module)]
            optimizers = [o for o in outs if hasattr(o, "step") and hasattr(o, "param_groups")]
            for model in models:
                for opt in optimizers:
                    self._fp8_amax_syncs.append(attach_amax_sync(opt, self.unwrap_model(model)))
        return prepared
