"""Entry points: how narrowgate finds every experiment and model family, its own and any installed plugin's.

Each is an entry point of its distribution: group ``narrowgate.experiments`` (name: the command,
``narrowgate run NAME``; value: the experiment class, ``package.module:Class``) or ``narrowgate.families``
(name: the family's ``name``; value: its adapter class), read from installed metadata (`importlib.metadata`).
A plugin taking a name already taken (by narrowgate or another plugin) is refused, naming both; a misdeclared
or broken one fails with one line naming its distribution and entry point (`PluginError`). This module
imports nothing of narrowgate above its errors, so the packages that hold experiments and families can use
it; reading their sources for ``--help`` without importing them is `narrowgate.catalog`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import NarrowgateError

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

_T = TypeVar("_T")

#: The entry-point groups: one for experiments, one for model families.
EXPERIMENTS_GROUP = "narrowgate.experiments"
FAMILIES_GROUP = "narrowgate.families"
#: The distribution whose entry points are the built-ins (listed first; a plugin may not take their names).
_OWN = "narrowgate"


class PluginError(NarrowgateError):
    """An experiment or family entry point that is misdeclared, cannot be loaded, or takes a name already taken."""


def _dist(ep: EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "an unnamed distribution"


def _who(ep: EntryPoint) -> str:
    return f"{_dist(ep)}'s entry point '{ep.name} = {ep.value}' (group {ep.group})"


def target(ep: EntryPoint) -> tuple[str, str]:
    """(module, class name) an entry point names; refuses any value but ``package.module:Class``."""
    match = ep.pattern.match(ep.value)
    if match is None or not match.group("attr") or "." in match.group("attr"):
        raise PluginError(
            f"{_who(ep)} is misdeclared: its value must be 'package.module:Class' (one class of one module)."
        )
    return match.group("module"), match.group("attr")


@cache
def _installed() -> Any:
    """Every installed distribution's entry points (one scan of their metadata for both groups)."""
    from importlib.metadata import entry_points  # not at import: `narrowgate --help` needs none

    return entry_points()


@cache
def points(group: str) -> dict[str, EntryPoint]:
    """Every entry point of ``group`` by name: narrowgate's own first, in the order declared, then the plugins'."""
    found = list(_installed().select(group=group))
    own = [ep for ep in found if _dist(ep) == _OWN]
    if not own:
        raise NarrowgateError(
            f"narrowgate's installed metadata declares no {group} entry points: the installation is missing or "
            "stale. Reinstall narrowgate (in a checkout: pip install -e . or source scripts/env.sh)."
        )
    out: dict[str, EntryPoint] = {}
    for ep in own + [ep for ep in found if _dist(ep) != _OWN]:
        if ep.name in out:
            taken = "a built-in of narrowgate" if _dist(out[ep.name]) == _OWN else "another plugin's"
            raise PluginError(
                f"{_who(ep)} takes the name {ep.name!r}, already {taken}: {_who(out[ep.name])}. "
                "Rename the plugin's entry point (or uninstall one of the two)."
            )
        target(ep)
        out[ep.name] = ep
    return out


def load(ep: EntryPoint, base: Callable[[], type[_T]], what: str) -> type[_T]:
    """The class ``ep`` names, checked to be a subclass of ``base()`` named as its entry point; a plugin's failure
    is one line. ``base`` is imported after the plugin, so a plugin that cannot be imported fails before torch loads.
    """
    module, attr = target(ep)
    try:
        cls = ep.load()
    except Exception as e:
        if _dist(ep) == _OWN:
            raise  # narrowgate's own: a bug, with its traceback
        raise PluginError(f"{_who(ep)} cannot be loaded: {type(e).__name__}: {e}".rstrip(": ")) from e
    parent = base()
    if not (isinstance(cls, type) and issubclass(cls, parent)):
        raise PluginError(f"{_who(ep)} names {cls!r}, not a subclass of {parent.__module__}.{parent.__name__}.")
    if getattr(cls, "name", None) != ep.name:
        raise PluginError(
            f"{_who(ep)} names {what} {module}.{attr}, whose name is {getattr(cls, 'name', None)!r}: "
            f"set its name = {ep.name!r}, or name the entry point {getattr(cls, 'name', None)!r}."
        )
    return cls


def load_all(group: str, base: Callable[[], type[_T]], what: str) -> tuple[type[_T], ...]:
    """Every class of ``group``, in the order of `points`, each checked by `load` (imports them, hence torch)."""
    return tuple(load(ep, base, what) for ep in points(group).values())
