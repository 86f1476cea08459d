"""Discovery by entry points: a third-party package adds an experiment and a family without editing narrowgate.

The plugin is written into a temporary folder as an installed distribution would leave it (its module, and a
``.dist-info`` with ``METADATA`` and ``entry_points.txt``) and put on PYTHONPATH for a subprocess: its
experiment and family show up in ``narrowgate run --help`` and ``narrowgate models`` without torch loading,
the family serves a checkpoint of its model type, and the experiment runs. A plugin that is misdeclared,
broken, or takes a built-in's name is refused on one line naming it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pandas as pd
import pytest

from narrowgate import catalog, plugins
from narrowgate.analyses import EXPERIMENTS
from narrowgate.families import FAMILIES

PLUGIN = '''\
"""EOI norm: how large the [EOI] residual is at each depth (a third-party plugin).

Also a family: LLaVA-NeXT-Video served by the generic adapter's hooks under the plugin's own name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from narrowgate.analyses.base import Experiment, stack
from narrowgate.analyses.options import RunConfig, option
from narrowgate.engine.interventions import Capture
from narrowgate.families.generic import Generic


@dataclass
class EoiNormConfig(RunConfig):
    prompt: str = option("Describe the image.", "The prompt after the image.")


def _setting(cfg, key):
    return cfg[key] if isinstance(cfg, dict) else getattr(cfg, key)


class EoiNorm(Experiment):
    name = "eoi-norm"
    task = "classes"
    config = EoiNormConfig

    def process(self, vlm, units, images, cfg):
        batch = vlm.prepare([im[0] for im in images], [_setting(cfg, "prompt")] * len(units))
        eoi = vlm.forward(batch, capture=Capture(("eoi",))).residuals["eoi"]
        return [{"example_id": u.id} for u in units], {"norm": eoi.float().norm(dim=-1).numpy()}

    def aggregate(self, records, cfg, info):
        norm = stack(records.arrays, "norm")
        return {"eoi_norm": pd.DataFrame({"resid": np.arange(norm.shape[1]), "norm": norm.mean(0)})}


class NextVideo(Generic):
    name = "nextvideo"
    model_types = ("llava_next_video",)
    checkpoints = ("llava-hf/LLaVA-NeXT-Video-7B-hf",)
    eoi_doc = "No end-of-image token: eoi is the first token after the image tokens."

    def __init__(self, processor, config):
        super().__init__(processor, config)
        self.name = type(self).name
'''


def _plugin(root: Path, entry_points: str, source: str = PLUGIN, dist: str = "ng_plugin_demo") -> Path:
    """An installed plugin distribution in ``root``: module ``ng_plugin_demo`` and its dist-info."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "ng_plugin_demo.py").write_text(source)
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    return root


GOOD = """\
    [narrowgate.experiments]
    eoi-norm = ng_plugin_demo:EoiNorm

    [narrowgate.families]
    nextvideo = ng_plugin_demo:NextVideo
"""


def _narrowgate(plugin: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(plugin), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "narrowgate.cli", *args], env=env, capture_output=True, text=True)


def _light(plugin: Path, calls: list[list[str]]) -> list:
    """Each call's exit code and output, through the CLI in one fresh process, and whether torch loaded."""
    code = (
        "import sys, json; from narrowgate.cli import app; from typer.testing import CliRunner; "
        f"out = [[(r := CliRunner().invoke(app, c, env={{'COLUMNS': '200'}})).exit_code, r.output] for c in {calls!r}]; "
        "print(json.dumps([out, sorted(m for m in ('torch', 'transformers') if m in sys.modules)]))"
    )
    env = {**os.environ, "PYTHONPATH": str(plugin)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_a_plugin_experiment_and_family_are_listed_without_loading_torch(tmp_path):
    plugin = _plugin(tmp_path / "site", GOOD)
    (listing, usage, models), heavy = _light(plugin, [["run", "--help"], ["run", "eoi-norm", "--help"], ["models"]])
    assert heavy == []
    assert listing[0] == 0 and "eoi-norm" in listing[1]
    assert "EOI norm: how large the [EOI] residual is at each depth" in listing[1]
    assert all(name in listing[1] for name in EXPERIMENTS)  # the built-ins, as before
    assert usage[0] == 0 and "--prompt" in usage[1] and "--model" in usage[1], usage[1]
    assert models[0] == 0 and "nextvideo" in models[1] and "llava-hf/LLaVA-NeXT-Video-7B-hf" in models[1]
    assert all(fam.name in models[1] for fam in FAMILIES)


@pytest.mark.slow
def test_a_plugin_family_serves_its_model_type_and_a_plugin_experiment_runs(tmp_path, checkpoint_dir):
    plugin = _plugin(tmp_path / "site", GOOD)
    out = tmp_path / "run"
    args = ["run", "eoi-norm", "--model", str(checkpoint_dir("llava_next_video")), "--data", "synthetic"]
    result = _narrowgate(plugin, *args, "-n", "4", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["experiment"] == "eoi-norm"
    assert manifest["model"]["model_type"] == "llava_next_video"
    assert manifest["model"]["family"] == "nextvideo"  # the plugin's adapter, not the generic one
    table = pd.read_csv(out / "tables" / "eoi_norm.csv")
    assert list(table["resid"]) == list(range(manifest["model"]["n_layers"] + 1))
    assert (table["norm"] > 0).all() and table["norm"].notna().all()
    # Residual 0 at [EOI] is the embedding of the token after the image (no end-of-image token here: the newline),
    # the same for every example: read with transformers alone.
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    path = checkpoint_dir("llava_next_video")
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("USER: <image>\nDescribe the image. ASSISTANT:", add_special_tokens=False)["input_ids"]
    after_image = ids[ids.index(tok.convert_tokens_to_ids("<image>")) + 1]
    weight = AutoModelForImageTextToText.from_pretrained(path).get_input_embeddings().weight
    assert table["norm"][0] == pytest.approx(weight[after_image].float().norm().item(), rel=1e-5)
    assert not (out / "tables" / "failures.csv").exists() or pd.read_csv(out / "tables" / "failures.csv").empty


@pytest.mark.parametrize(
    ("entry_points", "source", "needle"),
    [
        ("[narrowgate.experiments]\nablation = ng_plugin_demo:EoiNorm\n", PLUGIN, "already a built-in of narrowgate"),
        ("[narrowgate.families]\nllava = ng_plugin_demo:NextVideo\n", PLUGIN, "already a built-in of narrowgate"),
        ("[narrowgate.experiments]\neoi-norm = ng_plugin_demo\n", PLUGIN, "misdeclared"),
        (
            "[narrowgate.experiments]\neoi-norm = ng_plugin_absent:EoiNorm\n",
            PLUGIN,
            "cannot be loaded: ModuleNotFoundError: No module named 'ng_plugin_absent'",
        ),
    ],
    ids=["experiment-name-taken", "family-name-taken", "no-class", "no-module"],
)
def test_a_bad_plugin_is_refused_on_one_line_naming_it(tmp_path, entry_points, source, needle):
    plugin = _plugin(tmp_path / "site", entry_points, source)
    command = ["models"] if "families" in entry_points else ["run", "--help"]
    result = _narrowgate(plugin, *command)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "ng-plugin-demo's entry point" in lines[0] and needle in lines[0], lines[0]


def test_a_plugin_that_fails_to_import_is_refused_when_run_on_one_line(tmp_path):
    broken = PLUGIN.replace("from __future__ import annotations", 'raise ImportError("needs the foo package")', 1)
    plugin = _plugin(tmp_path / "site", GOOD, broken)
    result = _narrowgate(plugin, "run", "eoi-norm", "--model", "native", "--data", "synthetic", "-n", "4")
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line and "ng-plugin-demo's entry point 'eoi-norm = ng_plugin_demo:EoiNorm'" in line, line
    assert "cannot be loaded: ImportError: needs the foo package" in line, line


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """``installed(entry_points, source)``: the plugin on this process's path, the catalog's caches emptied."""

    def install(entry_points: str = GOOD, source: str = PLUGIN) -> None:
        monkeypatch.syspath_prepend(str(_plugin(tmp_path / "site", entry_points, source)))
        catalog.points.cache_clear()
        plugins._installed.cache_clear()

    yield install
    catalog.points.cache_clear()
    plugins._installed.cache_clear()
    sys.modules.pop("ng_plugin_demo", None)


def test_a_plugin_class_named_unlike_its_entry_point_is_refused(installed):
    installed(source=PLUGIN.replace('name = "eoi-norm"', 'name = "eoi-size"'))
    with pytest.raises(plugins.PluginError, match=r"^ng-plugin-demo's entry point .* whose name is 'eoi-size'"):
        catalog.load_experiment("eoi-norm")


def test_a_plugin_entry_point_naming_no_experiment_is_refused(installed):
    installed("[narrowgate.experiments]\neoi-norm = ng_plugin_demo:NextVideo\n")
    with pytest.raises(plugins.PluginError, match=r"not a subclass of narrowgate\.analyses\.base\.Experiment"):
        catalog.load_experiment("eoi-norm")


def test_every_built_in_is_an_entry_point_of_narrowgate():
    """The one path: narrowgate's own experiments and families are found as a plugin's are."""
    assert list(EXPERIMENTS) == sorted(catalog.points(catalog.EXPERIMENTS_GROUP))
    assert [f.name for f in FAMILIES] == list(catalog.points(catalog.FAMILIES_GROUP))
    assert all(
        ep.dist is not None and ep.dist.name == "narrowgate" for ep in catalog.points(catalog.FAMILIES_GROUP).values()
    )


def test_family_cards_read_from_source_equal_the_loaded_families():
    cards = catalog.family_cards()
    assert [(c.name, c.model_types, c.checkpoints, c.eoi_doc) for c in cards] == [
        (f.name, f.model_types, f.checkpoints, f.eoi_doc) for f in FAMILIES
    ]
    for ep in catalog.points(catalog.FAMILIES_GROUP).values():
        assert catalog._literal_card(ep) is not None, f"{ep.name}: read by importing, not from its source"


def test_plugin_settings_are_rebuilt_from_source(installed):
    """`narrowgate run eoi-norm --help` reads the plugin's settings from its source (no import), field for field."""
    import importlib

    installed()
    light, _ = catalog.settings("eoi-norm")
    assert light.__module__ == "narrowgate._catalog.ng_plugin_demo"
    assert "ng_plugin_demo" not in sys.modules
    real = importlib.import_module("ng_plugin_demo").EoiNormConfig
    assert [(f.name, f.default, dict(f.metadata)) for f in fields(light)] == [
        (f.name, f.default, dict(f.metadata)) for f in fields(real)
    ]


def test_two_families_accepting_one_model_are_refused_naming_both(monkeypatch):
    from narrowgate import families
    from narrowgate.families import AmbiguousFamilyError, Llava

    clone = type("LlavaClone", (Llava,), {"name": "llava-clone", "__module__": "ng_plugin_demo"})
    monkeypatch.setattr(families, "FAMILIES", (*FAMILIES, clone))
    with pytest.raises(AmbiguousFamilyError, match=r"llava \(narrowgate\.families\.llava\), llava-clone \(ng_plugin"):
        families.family_for("llava", "clip_vision_model")


def test_every_experiment_and_family_class_of_narrowgate_is_declared():
    """A built-in left out of pyproject.toml's entry points would vanish from the command line: none is."""
    import importlib
    import inspect
    import pkgutil

    import narrowgate.analyses
    import narrowgate.families
    from narrowgate.analyses import Experiment
    from narrowgate.families import Family

    for package, base, declared in (
        (narrowgate.analyses, Experiment, set(EXPERIMENTS.values())),
        (narrowgate.families, Family, set(FAMILIES)),
    ):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            for _, cls in inspect.getmembers(module, inspect.isclass):
                concrete = cls.__module__ == module.__name__ and issubclass(cls, base) and cls is not base
                if concrete and cls.name and (base is Experiment or cls.model_types):
                    assert cls in declared, f"{cls.__module__}.{cls.__qualname__} has no entry point in pyproject.toml"


def test_an_installation_without_narrowgates_entry_points_is_refused_saying_to_reinstall(monkeypatch):
    """A checkout on the path but never installed (or installed before the entry points existed) has no metadata."""
    from importlib.metadata import EntryPoints

    from narrowgate.errors import NarrowgateError

    monkeypatch.setattr(plugins, "_installed", lambda: EntryPoints(()))
    catalog.points.cache_clear()
    try:
        with pytest.raises(NarrowgateError, match=r"declares no narrowgate\.experiments entry points.*Reinstall"):
            catalog.catalog()
    finally:
        catalog.points.cache_clear()
