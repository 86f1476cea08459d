"""The deprecation policy's one tool: a renamed public name keeps working for one minor version.

A keyword argument (and attribute) renamed in version X.Y still works until X.(Y+1), with a
`DeprecationWarning` that names its replacement and the version that removes it; docs/deprecations.md
lists every name in that state.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    import importlib.abc  # (not at run time: it imports importlib.resources, a cost at every --help)

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
    from ``module``, with a `DeprecationWarning` naming its new home; a moved submodule is named by its new
    package (pair it with `moved_module` so ``import module.name`` works too). Each name in ``lazy`` is the
    module's own, made by its function on first use and then kept in the module."""

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
        home = importlib.import_module(homes[name])
        if hasattr(home, name):
            return getattr(home, name)
        return importlib.import_module(f"{homes[name]}.{name}")  # a moved module: name is a submodule of its home

    return __getattr__


def _outside_import_machinery() -> int:
    """The ``stacklevel`` of the first frame outside importlib and this file: the line that wrote the import.

    `warnings.warn` leaves importlib's frames out of its count, so only this file's frames are counted."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and (
        frame.f_code.co_filename.startswith("<frozen importlib") or frame.f_code.co_filename == __file__
    ):
        level += frame.f_code.co_filename == __file__
        frame = frame.f_back
    return level


class _MovedModules:
    """Import hook (a meta path finder and its loader): ``import old`` (and ``from old import x``) gives the
    module now at ``new`` with a warning.

    No shim file exists at the old path, so code that imports every module of a package (``pkgutil``)
    never trips the warning; only a user naming the old path does.
    """

    def __init__(self) -> None:
        self.moves: dict[str, tuple[str, str, str]] = {}
        self._specs: dict[str, importlib.machinery.ModuleSpec | None] = {}  # old name -> the module's own spec

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        """A spec served by this loader for a moved module's old name, else None (the other finders' turn)."""
        return (
            importlib.machinery.ModuleSpec(fullname, cast("importlib.abc.Loader", self))
            if fullname in self.moves
            else None
        )

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        """The module at its new home, imported once (so both names are the same object)."""
        new, since, removed_in = self.moves[spec.name]
        warnings.warn(
            f"{spec.name} is deprecated since narrowgate {since} and will be removed in {removed_in}: use {new} "
            "(the same module).",
            DeprecationWarning,
            stacklevel=_outside_import_machinery(),
        )
        module = importlib.import_module(new)
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run (the module ran at its new home); give back the spec the import system overwrote."""
        assert module.__spec__ is not None  # the import system set it to the old name's spec
        module.__spec__ = self._specs.pop(module.__spec__.name)


_MOVED_MODULES = _MovedModules()


def moved_module(old: str, new: str, since: str, removed_in: str) -> None:
    """Keep ``import old`` working until ``removed_in``: it imports ``new`` with a `DeprecationWarning` naming it."""
    _MOVED_MODULES.moves[old] = (new, since, removed_in)
    if _MOVED_MODULES not in sys.meta_path:
        sys.meta_path.insert(0, _MOVED_MODULES)
