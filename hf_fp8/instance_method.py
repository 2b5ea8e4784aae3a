"""Per-instance method patches that survive pickling.

hf_fp8 gives individual modules of a user's model its own ``forward`` (fused norms, FP32 RoPE,
the FP32 loss) by setting an instance attribute, so the model's classes, and every other model
in the process, stay untouched. ``types.MethodType`` would do for calling, but pickle stores a
bound method as "look up this name on the instance", which after ``torch.load`` either fails
(the class has no such name) or, worse, finds the class's own method under the same name. A
:class:`PatchedMethod` pickles as (function by reference, instance), so ``torch.save(model)``
/ ``torch.load``, ``copy.deepcopy`` and multiprocessing keep the patch. It looks like a bound
method where libraries inspect one: ``__func__``, ``__self__``, and the signature without
``self`` (transformers' Trainer reads the forward's parameters to keep dataset columns).
"""

from __future__ import annotations

import types
from collections.abc import Callable

__all__ = ["PatchedMethod", "bind"]


class PatchedMethod:
    """``func`` bound to ``owner``; see the module docstring. ``func`` must be importable by its
    qualified name (a module-level function), so that pickle can store it by reference."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, func: Callable, owner: object) -> None:
        if "<locals>" in getattr(func, "__qualname__", "<locals>"):
            raise TypeError(f"PatchedMethod: {func!r} is not a module-level function, so it cannot be pickled")
        self.__func__ = func
        self.__self__ = owner

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return PatchedMethod, (self.__func__, self.__self__)

    @property
    def __wrapped__(self) -> types.MethodType:
        # inspect.signature / inspect.unwrap follow this: the bound method's signature (no self)
        return types.MethodType(self.__func__, self.__self__)

    @property
    def __name__(self) -> str:
        return self.__func__.__name__

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self.__func__.__doc__

    def __repr__(self) -> str:
        return f"<hf_fp8 patched method {self.__func__.__qualname__} of {type(self.__self__).__name__}>"


def bind(func: Callable, owner: object) -> PatchedMethod:
    """``func`` as ``owner``'s method, for ``owner.<name> = bind(func, owner)``."""
    return PatchedMethod(func, owner)
