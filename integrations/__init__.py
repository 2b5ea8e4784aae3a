"""Glue to the HuggingFace stack (transformers, accelerate, peft, safetensors).

Installed as ``hf_fp8.integrations``. Optional dependencies are imported lazily inside the
functions that need them, so importing this package never fails for a missing one.
"""

from __future__ import annotations

from ._availability import is_accelerate_available, is_peft_available, is_transformers_available, requires

__all__ = ["is_accelerate_available", "is_peft_available", "is_transformers_available", "requires"]
