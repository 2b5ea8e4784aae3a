"""accelerate: one line, ``accelerator = hf_fp8.Accelerator()``, and the recipe comes from the launch.

accelerate has no plugin registry (its kwargs handlers are a closed dict keyed by exact
class), so hf_fp8 ships an ``accelerate.Accelerator`` subclass that converts every model it
``prepare()``s. The recipe is read, in order, from the ``fp8_config`` argument, from
``HF_FP8_RECIPE`` (``tensorwise``, ``rowwise``, ``delayed``, ``full_bf16``, or the path of an
``Fp8Config`` JSON), or from accelerate's own FP8 launch settings
(``ACCELERATE_MIXED_PRECISION=fp8`` with ``ACCELERATE_FP8_FORMAT``/``_AMAX_HISTORY_LEN``/
``_AMAX_COMPUTE_ALGO``/``_MARGIN``, as ``accelerate launch`` sets them from a yaml's
``fp8_config``), translated to the closest hf_fp8 recipe. In every case accelerate's own FP8
backends are turned off (mixed precision becomes ``bf16``: BF16 autocast for what is not an
FP8 layer), so nothing re-wraps hf_fp8's layers. Converting inside ``prepare`` after the
optimizer exists is fine: ``convert`` keeps the same ``nn.Parameter`` objects.
"""

from __future__ import annotations

import logging
import os

import accelerate
from torch import nn

from hf_fp8.config import Fp8Config, Recipe

__all__ = ["Accelerator", "config_from_environment"]

logger = logging.getLogger(__name__)


def config_from_environment(environ: dict[str, str] | None = None) -> Fp8Config | None:
    env = os.environ if environ is None else environ
    recipe = env.get("HF_FP8_RECIPE", "").strip()
    if recipe:
        if recipe.lower() in ("full_bf16", "full-bf16", "none"):
            return Fp8Config(recipe=None)
        if recipe.lower() in {r.value for r in Recipe}:
            return Fp8Config(recipe=recipe)
        if os.path.isfile(recipe):
            return Fp8Config.from_json(recipe)
        raise ValueError(
            f"HF_FP8_RECIPE={recipe!r}: expected tensorwise, rowwise, delayed, full_bf16 or the path of an Fp8Config JSON"
        )
    if env.get("ACCELERATE_MIXED_PRECISION", "").lower() == "fp8":
        fmt = env.get("ACCELERATE_FP8_FORMAT", "HYBRID").upper()
        kw: dict = {"grad_format": "e4m3" if fmt == "E4M3" else "e5m2"}
        if "ACCELERATE_FP8_AMAX_HISTORY_LEN" in env or "ACCELERATE_FP8_AMAX_COMPUTE_ALGO" in env:
            kw["recipe"] = "delayed"
            kw["amax_history_len"] = int(env.get("ACCELERATE_FP8_AMAX_HISTORY_LEN", 16))
            kw["amax_compute_algo"] = env.get("ACCELERATE_FP8_AMAX_COMPUTE_ALGO", "max").lower()
            kw["margin"] = int(env.get("ACCELERATE_FP8_MARGIN", 0))
        else:
            kw["recipe"] = "tensorwise"
        return Fp8Config(**kw)
    return None


class Accelerator(accelerate.Accelerator):
    """An ``accelerate.Accelerator`` whose ``prepare()`` converts models with hf_fp8.

    Args:
        fp8_config (`Fp8Config` or `str`, *optional*): the recipe; default from the environment
            (see the module docstring). With none found it behaves exactly like ``accelerate.Accelerator``.
        *args, **kwargs: ``accelerate.Accelerator``'s.
    """

    def __init__(self, *args, fp8_config: Fp8Config | str | None = None, **kwargs) -> None:
        if isinstance(fp8_config, str):
            fp8_config = Fp8Config(recipe=fp8_config)
        config = fp8_config or config_from_environment()
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

    def prepare(self, *args, **kwargs):
        if self.fp8_config is not None:
            from hf_fp8.convert import convert
            from hf_fp8.linear import Fp8Linear

            for obj in args:
                if isinstance(obj, nn.Module) and not any(isinstance(m, Fp8Linear) for m in obj.modules()):
                    report = convert(obj, self.fp8_config)
                    self.fp8_reports.append(report)
                    if self.is_main_process:
                        print(report, flush=True)
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
