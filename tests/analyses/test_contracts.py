"""Issue 28: the contracts an experiment keeps, checked on every experiment.

Every hook receives the experiment's own settings dataclass, annotated as such, so a misspelt setting is a
type error (shown by running mypy on one, `test_mypy_catches_a_misspelt_setting`, slow) and, here without mypy,
every ``cfg.<name>`` an experiment module reads is a field of the settings class its function declares.
Experiments never import each other: what two share lives in `narrowgate.metrics`, `analyses/options.py` or
`analyses/base.py`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest

from narrowgate.analyses import EXPERIMENTS
from narrowgate.analyses.base import Experiment
from narrowgate.errors import OptionError
from narrowgate.runner import run, settings_of, values

ANALYSES = Path(importlib.import_module("narrowgate.analyses").__file__).parent
HOOKS = ("examples", "units", "check", "check_model", "process", "aggregate", "figures", "prompt_kinds", "requested")


def _experiment_modules() -> dict[str, ast.Module]:
    """Module name -> syntax tree, for the modules of ``analyses/`` that define a ``@register``-ed experiment."""
    out = {}
    for path in sorted(ANALYSES.glob("*.py")):
        tree = ast.parse(path.read_text())
        if any(
            isinstance(n, ast.ClassDef) and any(getattr(d, "id", None) == "register" for d in n.decorator_list)
            for n in tree.body
        ):
            out[path.stem] = tree
    return out


def test_every_experiment_module_is_found():
    modules = _experiment_modules()
    assert {type(e).__module__.rsplit(".", 1)[-1] for e in (c() for c in EXPERIMENTS.values())} == set(modules)


def test_no_experiment_imports_another():
    modules = _experiment_modules()
    for name, tree in modules.items():
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    imported.add(node.module.split(".")[0])
                elif node.level == 1:  # from . import x
                    imported |= {a.name for a in node.names}
                elif node.module and node.module.startswith("narrowgate.analyses."):
                    imported.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                imported |= {a.name.split(".")[2] for a in node.names if a.name.startswith("narrowgate.analyses.")}
        assert not imported & (set(modules) - {name}), f"{name} imports experiment module(s) {imported & set(modules)}"


def _settings_reads() -> list[tuple[str, str, str, int]]:
    """(module, settings class named by the annotation, attribute read, line) of every ``cfg.<name>`` in a
    function of an experiment module whose ``cfg`` parameter is annotated with a settings class."""
    out = []
    for module, tree in _experiment_modules().items():
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            cfg = next((a for a in fn.args.args + fn.args.kwonlyargs if a.arg == "cfg"), None)
            if cfg is None or not isinstance(cfg.annotation, ast.Name):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cfg":
                    out.append((module, cfg.annotation.id, node.attr, node.lineno))
    return out


def test_every_setting_an_experiment_reads_exists():
    reads = _settings_reads()
    assert len(reads) > 100  # the experiments read their settings through attributes, not string keys
    for module, config, attr, line in reads:
        cls = getattr(importlib.import_module(f"narrowgate.analyses.{module}"), config)
        assert attr in {f.name for f in fields(cls)}, f"analyses/{module}.py:{line}: {config} has no setting {attr!r}"


def test_no_string_keys_into_settings():
    for path in ANALYSES.glob("*.py"):
        text = path.read_text()
        assert "cfg.get(" not in text and 'cfg["' not in text, path.name


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_hooks_are_annotated_with_the_experiments_own_settings(name):
    cls = EXPERIMENTS[name]
    assert issubclass(cls, Experiment) and inspect.isabstract(Experiment)
    for hook in HOOKS:
        owner = next(k for k in cls.__mro__ if hook in vars(k))
        if owner is Experiment or owner.__module__ == "narrowgate.analyses.base":
            continue  # the base's generic hooks: typed by the experiment's type argument
        annotation = inspect.signature(getattr(cls, hook)).parameters["cfg"].annotation
        assert annotation == cls.config.__name__, f"{name}.{hook}: cfg is annotated {annotation!r}"
        ret = inspect.signature(getattr(cls, hook)).return_annotation
        assert ret is not inspect.Signature.empty, f"{name}.{hook} declares no return type"


def test_an_experiment_without_process_or_aggregate_cannot_be_made():
    class Half(Experiment):
        name = "half"

    with pytest.raises(TypeError, match="abstract"):
        Half()


@pytest.mark.slow
def test_mypy_catches_a_misspelt_setting(tmp_path):
    """A hook reading ``cfg.sweep_stpe`` is a mypy error naming the setting; the right name passes."""
    source = """
        from typing import Any

        from narrowgate.analyses.ablation import AblationConfig
        from narrowgate.analyses.base import Experiment, Unit
        from narrowgate.store import Shard
        from narrowgate.vlm import VLM


        class Mine(Experiment[AblationConfig]):
            config = AblationConfig

            def process(
                self, vlm: VLM, units: list[Unit], images: list[tuple], cfg: AblationConfig
            ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
                return [{"step": cfg.SETTING}], {}

            def aggregate(self, records: Shard, cfg: AblationConfig, info: dict[str, Any]) -> dict:
                return {}
        """
    results = {}
    for setting in ("sweep_step", "sweep_stpe"):
        path = tmp_path / f"{setting}.py"
        path.write_text(textwrap.dedent(source).replace("SETTING", setting))
        results[setting] = subprocess.run(
            [sys.executable, "-m", "mypy", str(path)],  # the project's settings and cache: seconds once mypy ran
            capture_output=True,
            text=True,
            cwd=Path(__file__).parents[2],
            env={**os.environ, "MYPYPATH": str(ANALYSES.parents[1])},  # narrowgate's sources, not an editable hook
        )
    assert results["sweep_step"].returncode == 0, results["sweep_step"].stdout
    assert results["sweep_stpe"].returncode == 1
    assert '"AblationConfig" has no attribute "sweep_stpe"' in results["sweep_stpe"].stdout


GIVEN = {"model": "native", "data": "synthetic", "n_per_class": 3, "out": "somewhere", "batch_size": None}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_settings_are_one_instance_whose_values_are_the_old_config_dict(name):
    """What the manifest records (`runner.values`) is what the dict-based runner recorded: the defaults that are
    values, overridden by what was given and not None — so run directories made before still resume."""
    exp = EXPERIMENTS[name]()
    settings = settings_of(exp, GIVEN)
    assert isinstance(settings, exp.config)
    assert values(settings) == {**exp.defaults, **{k: v for k, v in GIVEN.items() if v is not None}}
    assert settings_of(exp, settings) == settings  # an instance is taken as it is (and checked the same way)
    assert settings_of(exp, exp.config(model="native", data="synthetic", n_per_class=3, out="somewhere")) == settings


def test_settings_are_checked_as_the_command_line_checks_them():
    exp = EXPERIMENTS["logit-lens"]()
    with pytest.raises(OptionError, match="logit-lens has no setting 'rolse'"):
        settings_of(exp, {**GIVEN, "rolse": ["eoi"]})
    with pytest.raises(OptionError, match="logit-lens needs data: give data=..."):
        settings_of(exp, {"model": "native"})
    with pytest.raises(OptionError, match="--n-per-class"):
        settings_of(exp, {**GIVEN, "n_per_class": 0})
    with pytest.raises(OptionError, match="--dtype 'float8' is not one of"):
        settings_of(exp, exp.config(model="native", data="synthetic", dtype="float8"))
    other = EXPERIMENTS["overlap"].config(model="native", data="synthetic")
    with pytest.raises(OptionError, match="logit-lens takes LogitLensConfig settings, not OverlapConfig"):
        settings_of(exp, other)


def test_a_run_begun_with_a_dict_resumes_from_an_instance_with_the_same_manifest(tmp_path):
    exp = EXPERIMENTS["logit-lens"]()
    given = dict(model="native", data="synthetic", n_per_class=2, out=str(tmp_path / "run"), progress=False)
    store = run(exp, given, command=["t"])
    manifest = (store.path / "manifest.json").read_bytes()
    config = json.loads(manifest)["config"]
    assert config["prompt"] == "This shape is a" and config["image_size"] == "processor"  # resolved into it
    again = run(exp, exp.config(**given), command=["t"])  # resumes: nothing left to do, nothing rewritten
    assert (again.path / "manifest.json").read_bytes() == manifest
    assert len(again.records().rows) == 12
