"""Availability checks with minimum versions, and a decorator whose error says what to install."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from collections.abc import Callable
from typing import TypeVar

from packaging.version import Version

# The oldest versions the project is tested with: pyproject.toml's lower bounds (a test checks they agree).
_MIN_VERSIONS = {"transformers": "5.17", "accelerate": "1.15", "peft": "0.21", "torchao": "0.14"}

F = TypeVar("F", bound=Callable)


def _available(package: str) -> bool:
    if importlib.util.find_spec(package) is None:
        return False
    try:
        return Version(importlib.metadata.version(package)) >= Version(_MIN_VERSIONS[package])
    except importlib.metadata.PackageNotFoundError:
        return False


def is_transformers_available() -> bool:
    return _available("transformers")


def is_accelerate_available() -> bool:
    return _available("accelerate")


def is_peft_available() -> bool:
    return _available("peft")


def requires(package: str) -> Callable[[F], F]:
    """Decorator: raise ImportError with the pip command if ``package`` (at its minimum version) is missing."""

    def decorator(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not _available(package):
                raise ImportError(
                    f"{fn.__qualname__} needs {package}>={_MIN_VERSIONS[package]}: "
                    f"pip install '{package}>={_MIN_VERSIONS[package]}'"
                )
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator
