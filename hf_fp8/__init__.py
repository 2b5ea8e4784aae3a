"""hf_fp8: FP8 and full-BF16 training for HuggingFace Transformers on NVIDIA Hopper GPUs.

One entry point::

    import hf_fp8
    report = hf_fp8.convert(model)  # Fp8Config(): the delayed recipe, the auto filter
    print(report)

Importing this package does no work: no device probing, no patching, no transformers import.
"""

from __future__ import annotations

from hf_fp8 import monitor, optim
from hf_fp8._backend import fp8_gemm_supported, kernel_backend
from hf_fp8.config import AmaxComputeAlgo, Fp8Config, Fp8Format, NonFinitePolicy, Recipe
from hf_fp8.convert import convert, nonfinite_modules, reset_nonfinite, revert
from hf_fp8.coverage import Fp8Coverage, fp8_coverage, reset_fp8_coverage
from hf_fp8.cuda_graph import CudaGraphStep
from hf_fp8.dtypes import set_default_dtype
from hf_fp8.frozen_fp8 import FrozenFp8Linear
from hf_fp8.fsdp_fp8 import enable_fp8_all_gather
from hf_fp8.integrations.loss import patch_loss, unpatch_loss
from hf_fp8.integrations.rope import RopePatch, patch_rope, unpatch_rope
from hf_fp8.linear import Fp8Linear, NonFiniteError
from hf_fp8.loss import chunked_linear_cross_entropy
from hf_fp8.monitor import Fp8Monitor, Fp8MonitorWarning
from hf_fp8.report import ConversionReport, ModuleDecision
from hf_fp8.state import Fp8StateError, Fp8StateWarning

__version__ = "0.1.0"

# Trainer integration imports transformers: loaded on first use, so `import hf_fp8` stays light.
_LAZY = {
    "Trainer": "trainer",
    "TrainingArguments": "trainer",
    "Fp8Callback": "trainer",
    "Fp8TrainerMixin": "trainer",
    "Fp8ArgumentsMixin": "trainer",
    "TrlLossWarning": "trainer",
    "register_attention": "attention",
    "make_training_arguments_class": "trainer",
    "save_fp8": "export",
    "Accelerator": "accelerate_plugin",
    "load_fp8": "export",
    "from_pretrained": "published",
    "Fp8MonitorCallback": "hf_fp8.monitor.callback",  # a full module path: not under integrations
}


# optional dependencies -> the pip extra that installs them
_EXTRAS = {"accelerate": "train", "peft": "train", "trl": "trl", "matplotlib": "monitor"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = _LAZY[name] if "." in _LAZY[name] else f"hf_fp8.integrations.{_LAZY[name]}"
        try:
            return getattr(importlib.import_module(module), name)
        except ModuleNotFoundError as e:
            extra = _EXTRAS.get((e.name or "").split(".")[0])
            if extra is None:
                raise
            raise ImportError(
                f"hf_fp8.{name} needs {e.name}, which is not installed: pip install 'hf_fp8[{extra}]' "
                f"(or pip install {e.name})"
            ) from e
    raise AttributeError(f"module 'hf_fp8' has no attribute {name!r}")


__all__ = [
    "Accelerator",
    "AmaxComputeAlgo",
    "Fp8ArgumentsMixin",
    "Fp8Callback",
    "Fp8TrainerMixin",
    "Trainer",
    "TrainingArguments",
    "TrlLossWarning",
    "ConversionReport",
    "CudaGraphStep",
    "Fp8Config",
    "Fp8Coverage",
    "Fp8Format",
    "Fp8Linear",
    "Fp8Monitor",
    "Fp8MonitorCallback",
    "Fp8MonitorWarning",
    "Fp8StateError",
    "Fp8StateWarning",
    "ModuleDecision",
    "NonFiniteError",
    "NonFinitePolicy",
    "Recipe",
    "RopePatch",
    "chunked_linear_cross_entropy",
    "convert",
    "enable_fp8_all_gather",
    "fp8_coverage",
    "fp8_gemm_supported",
    "kernel_backend",
    "load_fp8",
    "from_pretrained",
    "FrozenFp8Linear",
    "make_training_arguments_class",
    "monitor",
    "nonfinite_modules",
    "optim",
    "patch_loss",
    "patch_rope",
    "register_attention",
    "reset_fp8_coverage",
    "reset_nonfinite",
    "revert",
    "save_fp8",
    "set_default_dtype",
    "unpatch_loss",
    "unpatch_rope",
    "__version__",
]
