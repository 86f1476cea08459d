"""Where narrowgate finds its experiments and model families: entry points, read without importing them.

Every experiment and every family, narrowgate's own and those of any other installed package, is an entry
point of its distribution: group ``narrowgate.experiments`` (name: the command, ``narrowgate run NAME``;
value: the experiment class, ``package.module:Class``) or ``narrowgate.families`` (name: the family's
``name``; value: its adapter class), declared in the package's ``pyproject.toml`` and read from its
installed metadata (`importlib.metadata`). A plugin taking a name already taken (by narrowgate or by another
plugin) is refused, naming both; a misdeclared or broken one fails with one line naming its distribution and
entry point (`PluginError`).

Importing an experiment or a family loads torch (seconds, tens of seconds under load), yet ``narrowgate run
--help``, ``narrowgate run NAME --help``, every option error and ``narrowgate models`` need only names,
summaries, settings and a family's literal attributes. They are read from the source files the entry points
name, found without executing them: `catalog` and `summary` give an experiment module's docstring; `settings`
rebuilds an experiment's settings dataclass by executing, from its source, only what defines settings:
imports of ``dataclasses``, ``typing`` and ``math``, of the torch-free `narrowgate.errors` and
`narrowgate.parsing`, imports of sibling modules and of narrowgate's experiment
API (``narrowgate.analyses``, resolved the same way), module-level constants, functions and class definitions;
`family_cards` reads each family class's literal ``name``, ``model_types``, ``checkpoints`` and ``eoi_doc``.
Whatever the source does not spell out is taken from the loaded class after all (slow, never wrong). Tests
check that both readings equal the loaded classes for every built-in.
"""

from __future__ import annotations
import __future__

import ast
import importlib.util
import sys
import types
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .plugins import EXPERIMENTS_GROUP, FAMILIES_GROUP, load, load_all, points, target

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from .analyses.base import Experiment
    from .families.base import Family

_T = TypeVar("_T")

#: Where the rebuilt settings modules live (private names: never the real modules).
_PREFIX = "narrowgate._catalog"
#: Absolute imports a settings module may use (all light).
_LIGHT = ("__future__", "dataclasses", "typing", "math")
#: narrowgate's experiment API (options, base), which a plugin's settings import by absolute name.
_API = "narrowgate.analyses"
#: narrowgate's own torch-free modules a settings module may import from (``from ..parsing import ...``).
_LIGHT_OWN = ("narrowgate.errors", "narrowgate.parsing")


def _experiment_base() -> type[Experiment]:
    from .analyses.base import Experiment

    return Experiment


def _family_base() -> type[Family]:
    from .families.base import Family

    return Family


def load_experiment(name: str) -> type[Experiment]:
    """The experiment class of command ``name`` (imports it, hence torch)."""
    return load(points(EXPERIMENTS_GROUP)[name], _experiment_base, "experiment")


def load_families() -> tuple[type[Family], ...]:
    """Every family's adapter class, in the order of `points` (imports them, hence torch)."""
    return load_all(FAMILIES_GROUP, _family_base, "family")


# --- reading sources without executing them --------------------------------------------------------------------


def _source(module: str) -> Path | None:
    """The source file of ``module`` (``a/b.py`` or ``a/b/__init__.py``), found without importing anything."""
    loaded = sys.modules.get(module)
    if loaded is not None:
        file = getattr(loaded, "__file__", None)
        return Path(file) if file and file.endswith(".py") else None
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: finds, imports nothing
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    dirs = [Path(d) for d in spec.submodule_search_locations or []]
    for i, part in enumerate(rest):
        last = i == len(rest) - 1
        inner = []
        for d in dirs:
            if (d / part / "__init__.py").is_file():
                if last:
                    return d / part / "__init__.py"
                inner = [d / part]
                break
            if last and (d / f"{part}.py").is_file():
                return d / f"{part}.py"
            if (d / part).is_dir():
                inner.append(d / part)  # a namespace package
        dirs = inner
    return None


@cache
def _tree(module: str) -> ast.Module | None:
    path = _source(module)
    if path is None:
        return None
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None  # the import will say what is wrong


def _package(module: str) -> str:
    """The package a module's relative imports start from."""
    path = _source(module)
    return module if path is not None and path.name == "__init__.py" else module.rpartition(".")[0]


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a ``from X import ...`` names, relative imports resolved against ``package``."""
    if not node.level:
        return node.module or ""
    parts = package.split(".") if package else []
    base = ".".join(parts[: len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def _class(module: str, name: str) -> ast.ClassDef | None:
    tree = _tree(module)
    body = tree.body if tree is not None else []
    return next((n for n in body if isinstance(n, ast.ClassDef) and n.name == name), None)


def _assigned(st: ast.stmt, name: str) -> ast.expr | None:
    """The value ``st`` gives a class attribute ``name`` (``name = v`` or ``name: T = v``), else None."""
    if isinstance(st, ast.Assign) and getattr(st.targets[0], "id", None) == name:
        return st.value
    if isinstance(st, ast.AnnAssign) and getattr(st.target, "id", None) == name:
        return st.value
    return None


def _docstring(name: str) -> str:
    """The experiment module's docstring, from its source; from the module itself where there is no source."""
    module, _ = target(points(EXPERIMENTS_GROUP)[name])
    tree = _tree(module)
    if tree is None:  # compiled only, or absent: loading says which, in one line
        return sys.modules[load_experiment(name).__module__].__doc__ or ""
    return ast.get_docstring(tree) or ""


def catalog() -> dict[str, str]:
    """Every experiment's command name and one-line summary (its module docstring's first line), by name."""
    return {name: _docstring(name).split("\n")[0] for name in sorted(points(EXPERIMENTS_GROUP))}


def summary(name: str) -> str:
    """The experiment module's docstring up to its first blank line: the command's --help text."""
    return _docstring(name).split("\n\n")[0].replace("\n", " ")


# --- settings --------------------------------------------------------------------------------------------------

_building: set[str] = set()


def _follows(target: str, importer: str) -> bool:
    """Whether a settings rebuild follows an import of ``target`` from ``importer``: a sibling module, or
    narrowgate's experiment API, read from Python source and not already being rebuilt."""
    package = _package(importer)
    sibling = bool(package) and target.rpartition(".")[0] == package
    near = sibling or target == _API or target.startswith(f"{_API}.")
    return near and target not in _building and _tree(target) is not None


@cache
def _namespace(module: str) -> dict[str, Any]:
    """The settings-defining statements of ``module``'s source, executed in a private module."""
    tree = _tree(module)
    assert tree is not None, module
    mod = types.ModuleType(f"{_PREFIX}.{module}")
    sys.modules[mod.__name__] = mod  # dataclasses looks its class's module up
    ns = mod.__dict__
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tree.body)
    flags = __future__.annotations.compiler_flag if future else 0
    filename = str(_source(module))
    _building.add(module)
    try:
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (node.level or node.module not in _LIGHT):
                target = _absolute(node, _package(module))
                if target in _LIGHT_OWN:
                    own = importlib.import_module(target)
                    ns.update({a.asname or a.name: getattr(own, a.name) for a in node.names})
                    continue
                for alias in node.names:
                    if _follows(sub := f"{target}.{alias.name}", module):  # from package import module
                        _namespace(sub)
                        ns[alias.asname or alias.name] = sys.modules[f"{_PREFIX}.{sub}"]
                    elif _follows(target, module) and alias.name in (found := _namespace(target)):
                        ns[alias.asname or alias.name] = found[alias.name]
                continue
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if not all(n in _LIGHT for n in names) or "__future__" in names:
                    continue
            elif not isinstance(node, ast.Assign | ast.AnnAssign | ast.ClassDef | ast.FunctionDef):
                continue
            try:
                exec(compile(ast.Module([node], type_ignores=[]), filename, "exec", flags), ns)
            except Exception:  # noqa: BLE001 -- a statement needing more than settings is simply left out
                continue
    finally:
        _building.discard(module)
    return ns


def _config_name(module: str, cls: ast.ClassDef) -> tuple[str, str]:
    """(module, name) of the settings class an experiment class names as ``config`` (or inherits)."""
    for st in cls.body:
        if isinstance(value := _assigned(st, "config"), ast.Name):
            return module, value.id
    tree = _tree(module)
    assert tree is not None, module
    for base in (b.id for b in cls.bases if isinstance(b, ast.Name)):
        local = _class(module, base)
        if local is not None:
            return _config_name(module, local)
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and any(a.name == base and not a.asname for a in node.names):
                target = _absolute(node, _package(module))
                parent = _class(target, base)
                if parent is not None:
                    return _config_name(target, parent)
    return f"{_API}.options", "RunConfig"


def settings(name: str) -> tuple[type, dict]:
    """The settings dataclass of experiment ``name`` and the namespace its type hints resolve in."""
    module, attr = target(points(EXPERIMENTS_GROUP)[name])
    cls = _class(module, attr)
    if cls is not None:
        try:
            where, config = _config_name(module, cls)
            ns = _namespace(where) if _tree(where) is not None else {}
        except Exception:  # noqa: BLE001 -- a source this reader cannot follow: the class is loaded below
            ns = {}
        found = ns.get(config)
        if isinstance(found, type) and hasattr(found, "__dataclass_fields__") and fields(found):
            return found, ns
    real = load_experiment(name).config  # loads torch: only for settings this reader cannot rebuild
    return real, vars(sys.modules[real.__module__])


# --- families --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyCard:
    """What ``narrowgate models`` shows of a family: its name, model types, checkpoints and [EOI] token."""

    name: str
    model_types: tuple[str, ...]
    checkpoints: tuple[str, ...]
    eoi_doc: str


def _literal_card(ep: EntryPoint) -> FamilyCard | None:
    """The family's card from the literals its class body assigns, or None where it does not spell all out."""
    cls = _class(*target(ep))
    if cls is None:
        return None
    values: dict[str, Any] = {}
    for st in cls.body:
        for key in ("name", "model_types", "checkpoints", "eoi_doc"):
            if (value := _assigned(st, key)) is not None:
                try:
                    values[key] = ast.literal_eval(value)
                except ValueError:
                    return None
    try:
        card = FamilyCard(**values)
    except TypeError:
        return None
    tuples = all(
        isinstance(v, tuple) and all(isinstance(s, str) for s in v) for v in (card.model_types, card.checkpoints)
    )
    return card if card.name == ep.name and isinstance(card.eoi_doc, str) and tuples else None


def family_cards() -> list[FamilyCard]:
    """Every family's card, in the order of `points`: read from its source, else from its loaded class."""
    cards = []
    for ep in points(FAMILIES_GROUP).values():
        card = _literal_card(ep)
        if card is None:
            cls: Any = load(ep, _family_base, "family")
            card = FamilyCard(cls.name, tuple(cls.model_types), tuple(cls.checkpoints), cls.eoi_doc)
        cards.append(card)
    return cards
