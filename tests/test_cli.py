"""The command line: every command has --help; each experiment's options come from its settings alone;
`models` lists every family; `roles` prints the positions the engine uses."""

from __future__ import annotations

import re
from dataclasses import fields

from PIL import Image
from typer.testing import CliRunner

import narrowgate as ng
from narrowgate.analyses import EXPERIMENTS
from narrowgate.cli import app, catalog, commands
from narrowgate.families import FAMILIES

runner = CliRunner()


def test_every_command_has_help():
    paths = commands()  # what the command-line reference documents: groups and their commands included
    assert ["study", "emergence"] in paths and all(["run", name] in paths for name in EXPERIMENTS)
    assert {p[0] for p in paths if p} >= {c.name or c.callback.__name__ for c in app.registered_commands}
    listed = 0
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output and " ".join(path) in result.output
        help_lines = [line for line in result.output.splitlines() if "Show this message" in line]
        assert all("<" not in line for line in help_lines), help_lines  # a bare flag: no value type shown
        listed += len(help_lines)
    assert listed >= len(paths) - 1  # every help but 'run's (a plain list of experiments) lists --help


def _flags(config) -> set[str]:
    return {f.metadata.get("flag") or f"--{f.name.replace('_', '-')}" for f in fields(config) if f.metadata["cli"]}


def test_each_experiment_has_exactly_the_options_of_its_settings():
    assert set(catalog()) == set(EXPERIMENTS)
    every = set().union(*(_flags(e.config) for e in EXPERIMENTS.values()))
    for name, exp in EXPERIMENTS.items():
        result = runner.invoke(app, ["run", name, "--help"], env={"COLUMNS": "250"})
        assert result.exit_code == 0, result.output
        shown = set(re.findall(r"(--[a-z][a-z0-9-]*)", result.output)) & every
        assert shown == _flags(exp.config), name
    listing = runner.invoke(app, ["run", "--help"]).output
    assert all(name in listing for name in EXPERIMENTS)


def test_settings_read_without_importing_equal_the_real_ones():
    """`narrowgate run X --help` builds its options from settings rebuilt from the source (no torch); they must be
    the experiment's own, field for field: name, default, metadata and type."""
    import typing

    from narrowgate.catalog import settings

    for name, exp in EXPERIMENTS.items():
        light, namespace = settings(name)
        assert light is not exp.config, f"{name}: fell back to importing the experiment"
        assert light.__module__.startswith("narrowgate._catalog."), name
        real = {f.name: (f.default, dict(f.metadata)) for f in fields(exp.config)}
        assert {f.name: (f.default, dict(f.metadata)) for f in fields(light)} == real, name
        assert typing.get_type_hints(light, globalns=namespace) == typing.get_type_hints(exp.config), name


def test_models_lists_every_family():
    result = runner.invoke(app, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for fam in FAMILIES:
        assert fam.name in result.output
        assert fam.checkpoints and fam.checkpoints[0] in result.output


def test_roles_shows_the_positions_the_engine_uses(checkpoint_dir):
    path = checkpoint_dir("llava")
    result = runner.invoke(app, ["roles", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    vlm = ng.load(path)
    batch = vlm.prepare(
        [Image.new("RGB", (224, 224), (128, 128, 128))], ["Provide a one-sentence caption for the provided image."]
    )
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in result.output.splitlines()
        if line.count("│") >= 3
    }
    for role in ("bos", "eoi", "last", "first_image", "last_image"):
        pos = batch.positions(role)[0].tolist()
        assert rows[role] == f"{pos} ({len(pos)})", role
    n_image = len(batch.positions("image")[0])
    assert rows["image"].endswith(f"({n_image})")


def test_python_dash_m_narrowgate_is_the_command_line_and_its_help_loads_no_torch():
    import subprocess
    import sys

    code = (
        "import runpy, sys; sys.argv = ['narrowgate', 'run', '--help']\n"
        "try:\n    runpy.run_module('narrowgate', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "ablation" in out and "gate-scan" in out and out.strip().endswith("False")
