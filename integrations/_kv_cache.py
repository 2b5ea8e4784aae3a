"""The KV cache's argument name across transformers 5.x.

transformers 5.24 renamed the cache argument of the model, decoder-layer and attention forwards
from ``past_key_values`` to ``cache`` (the old name still works there, with a FutureWarning,
until 5.40), and the outputs' field likewise. hf_fp8's patched forwards take it under either
name and hand it on under the name the callee declares, so generation keeps its cache and no
deprecation warning comes from hf_fp8 on any 5.x.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from hf_fp8._backend import compile_time_constant

__all__ = ["cache_arg", "output_cache", "output_cache_field", "take_cache"]

# Facts of the installed transformers, cached by hand and marked constant for torch.compile (the
# patched forwards run inside compiled decoder layers; dynamo traced through lru_cache wrappers
# and broke the graph, see hf_fp8._backend)
_ARG: dict[Callable, str] = {}
_FIELD: dict[type, str] = {}


@compile_time_constant
def cache_arg(forward: Callable) -> str:
    """``"cache"`` if ``forward`` (an HF forward, decorators unwrapped) declares it, else ``"past_key_values"``."""
    if forward not in _ARG:
        try:
            params = inspect.signature(inspect.unwrap(forward)).parameters
        except (TypeError, ValueError):
            params = {}
        _ARG[forward] = "cache" if "cache" in params else "past_key_values"
    return _ARG[forward]


def take_cache(past_key_values: Any, kwargs: dict) -> Any:
    """The cache passed under either name (``cache`` is removed from ``kwargs``); None if neither."""
    cache = kwargs.pop("cache", None)
    return past_key_values if past_key_values is not None else cache


@compile_time_constant
def output_cache_field(output_class: type) -> str:
    """The cache field of an HF output dataclass: ``cache`` since 5.24, ``past_key_values`` before."""
    if output_class not in _FIELD:
        fields = getattr(output_class, "__dataclass_fields__", {})
        _FIELD[output_class] = "cache" if "cache" in fields else "past_key_values"
    return _FIELD[output_class]


def output_cache(outputs: Any) -> Any:
    """The cache an HF model output carries, under whichever name its class has."""
    return getattr(outputs, output_cache_field(type(outputs)), None)
