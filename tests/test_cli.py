"""The command line: every command has --help; `models` lists every family."""

from __future__ import annotations

from typer.testing import CliRunner

from narrowgate.cli import app
from narrowgate.families import FAMILIES

runner = CliRunner()


def test_every_command_has_help():
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_models_lists_every_family():
    result = runner.invoke(app, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for fam in FAMILIES:
        assert fam.name in result.output
        assert fam.checkpoints and fam.checkpoints[0] in result.output


def test_roles_shows_positions(checkpoint_dir):
    result = runner.invoke(app, ["roles", str(checkpoint_dir("llava"))], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "eoi" in result.output and "image" in result.output
