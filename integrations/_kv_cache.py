"""The KV cache's argument name across transformers 5.x.

transformers 5.24 renamed the cache argument of the model, decoder-layer and attention forwards
from ``past_key_values`` to ``cache`` (the old name still works there, with a FutureWarning,
until 5.40), and the outputs' field likewise. hf_fp8's patched forwards take it under either
name and hand it on under the name the callee declares, so generation keeps its cache and no
deprecation warning comes from hf_fp8 on any 5.x.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["cache_arg", "output_cache", "output_cache_field", "take_cache"]


@functools.cache
def cache_arg(forward: Callable) -> str:
    """``"cache"`` if ``forward`` (an HF forward, decorators unwrapped) declares it, else ``"past_key_values"``."""
    try:
        params = inspect.signature(inspect.unwrap(forward)).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def take_cache(past_key_values: Any, kwargs: dict) -> Any:
    """The cache passed under either name (``cache`` is removed from ``kwargs``); None if neither."""
    cache = kwargs.pop("cache", None)
    return past_key_values if past_key_values is not None else cache


@functools.cache
def output_cache_field(output_class: type) -> str:
    """The cache field of an HF output dataclass: ``cache`` since 5.24, ``past_key_values`` before."""
    fields = getattr(output_class, "__dataclass_fields__", {})
    return "cache" if "cache" in fields else "past_key_values"


def output_cache(outputs: Any) -> Any:
    """The cache an HF model output carries, under whichever name its class has."""
    return getattr(outputs, output_cache_field(type(outputs)), None)
