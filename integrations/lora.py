"""PEFT LoRA on layers whose base weight is FP8 only (``Fp8Config(fp8_weights=True)``, or a
published FP8 checkpoint's frozen layers from :func:`hf_fp8.from_pretrained`).

A stock PEFT LoRA layer wraps an :class:`~hf_fp8.Fp8Linear` as it wraps any ``nn.Linear``,
and training needs nothing more: the base forward is ours, the adapters take the layer's
``compute_dtype`` (PEFT reads that attribute, as for bitsandbytes), and PEFT keeps them in
FP32 by default. Merging is the one thing a stock LoRA layer cannot do to FP8 codes
(``weight.data += delta`` on FP8 is not defined), so layers with FP8-only weights get
:class:`Fp8LoraLinear`, a PEFT LoRA ``Linear`` whose ``merge`` dequantizes the base first:
``merge_and_unload()`` then returns a high-precision weight equal to dequantized base + delta
rounded once, and ``unmerge`` restores the FP8 codes bit for bit.

PEFT has no registry for LoRA layer types that applies without editing the user's
``LoraConfig``, so :func:`enable_peft_fp8_weights` wraps ``LoraModel._create_new_module``
once (idempotent, undone by :func:`disable_peft_fp8_weights`): it hands layers with FP8-only
weights to PEFT's own default dispatch and re-types the result; every other layer goes
through PEFT unchanged. :func:`hf_fp8.convert` calls it when it stores weights in FP8.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_fp8.linear import Fp8Linear

__all__ = ["Fp8LoraLinear", "enable_peft_fp8_weights", "disable_peft_fp8_weights"]

_original_create_new_module = None
Fp8LoraLinear: type | None = None  # built on first use: importing peft is slow and optional


def _build_lora_class() -> type:
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class _Fp8LoraLinear(LoraLinear):
        """PEFT LoRA ``Linear`` over an :class:`Fp8Linear` with an FP8-only base weight."""

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            base = self.get_base_layer()
            if not (base.has_fp8_weight and check_adapters_to_merge(self, adapter_names)):
                return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
            # Merge in FP32 on the dequantized base, round once to the original dtype; keep the
            # codes so that unmerge restores them exactly.
            self._fp8_codes_before_merge = (base.weight, base.fp8_weight_scale_inv, base.compute_dtype)
            base.weight = nn.Parameter(base.dense_weight(torch.float32), requires_grad=False)
            try:
                super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
            except BaseException:
                base.weight = self._fp8_codes_before_merge[0]
                del self._fp8_codes_before_merge
                raise
            base.weight = nn.Parameter(base.weight.detach().to(self._fp8_codes_before_merge[2]), requires_grad=False)

        def unmerge(self) -> None:
            super().unmerge()
            saved = getattr(self, "_fp8_codes_before_merge", None)
            if saved is not None and not self.merged:
                base = self.get_base_layer()
                base.weight, base.fp8_weight_scale_inv, base.compute_dtype = saved
                del self._fp8_codes_before_merge

    _Fp8LoraLinear.__name__ = _Fp8LoraLinear.__qualname__ = "Fp8LoraLinear"
    return _Fp8LoraLinear


def _fp8_weight_base(target: nn.Module) -> nn.Module | None:
    """The base layer with FP8-only weights (an :class:`Fp8Linear` with ``fp8_weights``, or a
    :class:`~hf_fp8.frozen_fp8.FrozenFp8Linear` from a published FP8 checkpoint), or None."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from hf_fp8.frozen_fp8 import FrozenFp8Linear

    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    return base if isinstance(base, (Fp8Linear, FrozenFp8Linear)) and base.has_fp8_weight else None


def enable_peft_fp8_weights() -> bool:
    """Route PEFT LoRA over FP8-only base weights to :class:`Fp8LoraLinear`. Returns False
    (and does nothing) when PEFT is not installed."""
    global _original_create_new_module, Fp8LoraLinear
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import dispatch_default
        from peft.tuners.lora.model import LoraModel
    except ImportError:
        return False
    if _original_create_new_module is not None:
        return True
    if Fp8LoraLinear is None:
        Fp8LoraLinear = _build_lora_class()
    original = LoraModel.__dict__["_create_new_module"]

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        if _fp8_weight_base(target) is not None:
            new = dispatch_default(target, adapter_name, config=lora_config, **kwargs)
            if type(new) is LoraLinear:
                new.__class__ = Fp8LoraLinear
                return new
        return original.__func__(lora_config, adapter_name, target, **kwargs)

    LoraModel._create_new_module = staticmethod(_create_new_module)
    _original_create_new_module = original
    return True


def disable_peft_fp8_weights() -> None:
    """Undo :func:`enable_peft_fp8_weights` (LoRA layers already built keep their class)."""
    global _original_create_new_module
    if _original_create_new_module is None:
        return
    from peft.tuners.lora.model import LoraModel

    LoraModel._create_new_module = _original_create_new_module
    _original_create_new_module = None
