"""The KV cache under either argument name (transformers 5.24 renamed past_key_values -> cache)."""

from __future__ import annotations

import dataclasses
import functools

from hf_fp8.integrations._kv_cache import cache_arg, output_cache, output_cache_field, take_cache


def _old_style(self, hidden_states, past_key_values=None, **kwargs):
    return past_key_values


def _new_style(self, hidden_states, cache=None, **kwargs):
    return cache


def test_cache_arg_reads_the_declared_name_through_decorators():
    def deprecating(fn):  # as transformers' deprecate_kwarg wraps a forward
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)

        return wrapper

    assert cache_arg(_old_style) == "past_key_values"
    assert cache_arg(_new_style) == "cache"
    assert cache_arg(deprecating(_new_style)) == "cache"
    assert cache_arg(print) == "past_key_values"  # no signature to read: the name of transformers < 5.24


def test_take_cache_accepts_either_name_and_removes_the_new_one():
    sentinel = object()
    kwargs = {"cache": sentinel, "other": 1}
    assert take_cache(None, kwargs) is sentinel and kwargs == {"other": 1}
    kwargs = {"other": 1}
    assert take_cache(sentinel, kwargs) is sentinel and kwargs == {"other": 1}
    assert take_cache(None, {}) is None


def test_output_cache_field_follows_the_output_class():
    @dataclasses.dataclass
    class Old:
        past_key_values: object = None

    @dataclasses.dataclass
    class New:
        cache: object = None

    assert output_cache_field(Old) == "past_key_values" and output_cache_field(New) == "cache"
    assert output_cache(Old(past_key_values=3)) == 3 and output_cache(New(cache=4)) == 4
