"""The experiments as the command line sees them, read from their sources without importing them.

Importing an experiment module loads torch (seconds, tens of seconds under load), yet ``narrowgate
run EXPERIMENT --help`` and every option error need only the experiment's name, summary and settings
class. `catalog` lists the classes decorated ``@register`` in ``narrowgate/analyses/*.py``;
`settings` rebuilds one experiment's settings dataclass by executing, from its source, only what
defines settings: imports of `options`, ``dataclasses`` and ``typing``, of the torch-free `narrowgate.errors`
and `narrowgate.parsing`, imports of other experiment
modules (resolved the same way), module-level constants, functions and class definitions. A statement that needs
anything else is left out; if that leaves the settings class undefined, `settings` imports the
experiment after all (slow, never wrong). A test checks that every experiment's rebuilt settings equal
its real ones.
"""

from __future__ import annotations
import __future__

import ast
import importlib
import sys
import types
from dataclasses import fields
from functools import cache
from pathlib import Path

ANALYSES = Path(__file__).parent / "analyses"
#: Where the rebuilt settings modules live (private names: never the real modules).
_PREFIX = "narrowgate._catalog"
#: Absolute imports a settings module may use (all light).
_LIGHT = ("__future__", "dataclasses", "typing", "math")
#: narrowgate's own modules a settings module may import from (``from ..parsing import ...``): torch-free.
_LIGHT_OWN = ("errors", "parsing")


@cache
def _tree(module: str) -> ast.Module:
    return ast.parse((ANALYSES / f"{module}.py").read_text())


def _assigned(st: ast.stmt, name: str) -> ast.expr | None:
    """The value ``st`` gives a class attribute ``name`` (``name = v`` or ``name: T = v``), else None."""
    if isinstance(st, ast.Assign) and getattr(st.targets[0], "id", None) == name:
        return st.value
    if isinstance(st, ast.AnnAssign) and getattr(st.target, "id", None) == name:
        return st.value
    return None


def _registered() -> dict[str, tuple[str, ast.ClassDef]]:
    """Command name -> (module, class) of every class decorated ``@register``."""
    out: dict[str, tuple[str, ast.ClassDef]] = {}
    for path in sorted(ANALYSES.glob("*.py")):
        for node in _tree(path.stem).body:
            if isinstance(node, ast.ClassDef) and any(
                getattr(d, "id", None) == "register" for d in node.decorator_list
            ):
                name = next(value.value for st in node.body if isinstance(value := _assigned(st, "name"), ast.Constant))
                out[str(name)] = (path.stem, node)  # a literal string (the name = "..." rule)
    return dict(sorted(out.items()))


def catalog() -> dict[str, str]:
    """Every experiment's command name and one-line summary (its module docstring's first line)."""
    return {
        name: (ast.get_docstring(_tree(module)) or "").split("\n")[0] for name, (module, _) in _registered().items()
    }


def summary(name: str) -> str:
    """The experiment module's docstring up to its first blank line: the command's --help text."""
    module, _ = _registered()[name]
    return (ast.get_docstring(_tree(module)) or "").split("\n\n")[0].replace("\n", " ")


@cache
def _namespace(module: str) -> dict:
    """The settings-defining statements of ``analyses/<module>.py``, executed in a private module."""
    tree = _tree(module)
    mod = types.ModuleType(f"{_PREFIX}.{module}")
    sys.modules[mod.__name__] = mod  # dataclasses looks its class's module up
    ns = mod.__dict__
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tree.body)
    flags = __future__.annotations.compiler_flag if future else 0
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module and (ANALYSES / f"{node.module}.py").is_file():
                sibling = _namespace(node.module)
                ns.update({a.asname or a.name: sibling[a.name] for a in node.names if a.name in sibling})
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module in _LIGHT_OWN:
            own = importlib.import_module(f"narrowgate.{node.module}")
            ns.update({a.asname or a.name: getattr(own, a.name) for a in node.names})
            continue
        if isinstance(node, ast.ImportFrom | ast.Import):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if not all(n in _LIGHT for n in names) or "__future__" in names:
                continue
        elif not isinstance(node, ast.Assign | ast.AnnAssign | ast.ClassDef | ast.FunctionDef):
            continue
        try:
            exec(compile(ast.Module([node], type_ignores=[]), str(ANALYSES / f"{module}.py"), "exec", flags), ns)
        except Exception:  # noqa: BLE001 -- a statement needing more than settings is simply left out
            continue
    return ns


def _config_name(module: str, cls: ast.ClassDef) -> tuple[str, str]:
    """(module, name) of the settings class an experiment class names as ``config`` (or inherits)."""
    for st in cls.body:
        if isinstance(value := _assigned(st, "config"), ast.Name):
            return module, value.id
    tree = _tree(module)
    for base in (b.id for b in cls.bases if isinstance(b, ast.Name)):
        local = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == base), None)
        if local is not None:
            return _config_name(module, local)
        for node in tree.body:
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 1
                and node.module is not None
                and any(a.name == base for a in node.names)
                and (ANALYSES / f"{node.module}.py").is_file()
            ):
                parent = next(n for n in _tree(node.module).body if isinstance(n, ast.ClassDef) and n.name == base)
                return _config_name(node.module, parent)
    return "options", "RunConfig"


def settings(name: str) -> tuple[type, dict]:
    """The settings dataclass of experiment ``name`` and the namespace its type hints resolve in."""
    module, cls = _registered()[name]
    where, config = _config_name(module, cls)
    ns = _namespace(where)
    found = ns.get(config)
    if isinstance(found, type) and hasattr(found, "__dataclass_fields__") and fields(found):
        return found, ns
    from .analyses import EXPERIMENTS  # loads torch: only for settings this reader cannot rebuild

    real = EXPERIMENTS[name].config
    return real, vars(sys.modules[real.__module__])
