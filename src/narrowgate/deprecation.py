"""The deprecation policy's one tool: a renamed public name keeps working for one minor version.

A keyword argument (and attribute) renamed in version X.Y still works until X.(Y+1), with a
`DeprecationWarning` that names its replacement and the version that removes it; docs/deprecations.md
lists every name in that state.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

_T = TypeVar("_T")


def renamed(since: str, removed_in: str, **renames: str) -> Callable[[type[_T]], type[_T]]:
    """Class decorator: each ``old="new"`` keyword of the constructor, and attribute ``old``, still work
    (mapped to ``new``) with a `DeprecationWarning` naming ``new``."""

    def decorate(cls: type[_T]) -> type[_T]:
        init = cls.__init__

        def message(old: str, new: str, what: str) -> str:
            return (
                f"{cls.__name__}{what.format(old)} is deprecated since narrowgate {since} and will be removed in "
                f"{removed_in}: use {cls.__name__}{what.format(new)} (the same value)."
            )

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{cls.__name__}() got both {old}= (deprecated) and {new}=; give {new}= only.")
                    warnings.warn(message(old, new, "({}=...)"), DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        setattr(cls, "__init__", __init__)
        for old, new in renames.items():

            def read(self, old=old, new=new):
                warnings.warn(message(old, new, ".{}"), DeprecationWarning, stacklevel=2)
                return getattr(self, new)

            setattr(cls, old, property(read, doc=f"Deprecated alias of `{new}` (removed in {removed_in})."))
        return cls

    return decorate


#: Modules whose deprecation notices are about their own internals (e.g. peft reading transformers' deprecated
#: ``is_gradient_checkpointing``), which a narrowgate user can neither act on nor silence by changing their code.
DEPENDENCIES = r"(transformers|peft|accelerate|huggingface_hub)(\..*)?$"


@contextlib.contextmanager
def dependency_deprecations_hidden() -> Iterator[None]:
    """Within the block, DeprecationWarning / FutureWarning / PendingDeprecationWarning raised inside
    narrowgate's dependencies (`DEPENDENCIES`) are not shown; narrowgate's own deprecations still are."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=DEPENDENCIES)
        yield


def moved(
    module: str, since: str, removed_in: str, *, lazy: dict[str, Callable[[], Any]] | None = None, **homes: str
) -> Callable[[str], Any]:
    """A module ``__getattr__`` under which each name in ``homes`` (name -> the module it moved to) still imports
    from ``module``, with a `DeprecationWarning` naming its new home. Each name in ``lazy`` is the module's own,
    made by its function on first use and then kept in the module."""

    def __getattr__(name: str) -> Any:
        if lazy is not None and name in lazy:
            value = lazy[name]()
            setattr(importlib.import_module(module), name, value)
            return value
        if name not in homes:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(
            f"{module}.{name} is deprecated since narrowgate {since} and will be removed in {removed_in}: "
            f"use {homes[name]}.{name} (the same object).",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(homes[name]), name)

    return __getattr__
