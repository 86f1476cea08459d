"""The deprecation policy: a renamed public name keeps working for one minor version, warning with its replacement.

pyproject's pytest settings ignore DeprecationWarning globally; `pytest.warns` records it regardless.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

import narrowgate as ng


@pytest.fixture(scope="module")
def organism():
    vlm = ng.load("gated", dtype="float32")
    images = [Image.new("RGB", (64, 64), c) for c in ((200, 30, 30), (30, 30, 200))]
    return vlm, vlm.prepare(images, ["This shape is a"] * 2)


def test_patch_layer_keyword_still_works_and_names_resid(organism):
    vlm, batch = organism
    value = torch.randn(batch.size, vlm.hidden_size)
    with pytest.warns(DeprecationWarning, match=r"Patch\(layer=\.\.\.\) is deprecated.*use Patch\(resid=\.\.\.\)") as w:
        old = ng.Patch("eoi", layer=3, value=value)
    assert w[0].filename == __file__  # the warning points at the caller's line, not at narrowgate
    assert old.resid == 3
    new = ng.Patch("eoi", resid=3, value=value)
    a = vlm.forward(batch, patches=[old]).logits
    b = vlm.forward(batch, patches=[new]).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, vlm.forward(batch).logits)  # the patch did something
    with pytest.warns(DeprecationWarning, match=r"Patch\.layer is deprecated.*Patch\.resid"):
        assert old.layer == 3


def test_capture_layers_keyword_still_works_and_names_resids(organism):
    vlm, batch = organism
    with pytest.warns(DeprecationWarning, match=r"Capture\(layers=\.\.\.\).*use Capture\(resids=\.\.\.\)"):
        old = ng.Capture("eoi", layers=(0, 2))
    got = vlm.forward(batch, capture=old).residuals["eoi"]
    want = vlm.forward(batch, capture=ng.Capture("eoi", resids=(0, 2))).residuals["eoi"]
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_new_names_do_not_warn_and_both_names_are_refused():
    value = torch.zeros(1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ng.Patch("eoi", resid=1, value=value)
        ng.Patch("eoi", 1, value)
        ng.Capture("eoi", resids=(0,))
    with pytest.raises(TypeError, match="both layer= .deprecated. and resid="):
        ng.Patch("eoi", layer=1, resid=1, value=value)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("narrowgate.analyses.base:run", "narrowgate.runner:run"),
        ("narrowgate.analyses:run", "narrowgate.runner:run"),
        ("narrowgate.analyses.base:Ranks", "narrowgate.distributed:Ranks"),
        ("narrowgate.analyses.base:check_k", "narrowgate.metrics.overlap:check_k"),
        ("narrowgate.analyses.base:sweep_step", "narrowgate.analyses.options:sweep_step"),
        ("narrowgate.errors:parse_layer_set", "narrowgate.parsing:parse_layer_set"),
        ("narrowgate.errors:parse_image_size", "narrowgate.parsing:parse_image_size"),
        ("narrowgate.errors:parse_size", "narrowgate.parsing:parse_size"),
        ("narrowgate.errors:check_count", "narrowgate.parsing:check_count"),
    ],
)
def test_moved_names_still_import_with_a_warning_naming_their_new_home(old, new):
    import importlib

    old_module, name = old.split(":")
    new_module, _ = new.split(":")
    with pytest.warns(
        DeprecationWarning, match=rf"{old_module}\.{name} is deprecated since .* use {new_module}\.{name}"
    ):
        value = getattr(importlib.import_module(old_module), name)
    assert value is getattr(importlib.import_module(new_module), name)


def test_a_name_that_never_existed_is_still_an_attribute_error():
    import narrowgate.analyses.base as base

    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        base.nothing  # noqa: B018


@pytest.fixture
def old_module_paths_unimported(monkeypatch):
    """Forget any earlier import of the old module paths, so each test sees the first import's warning."""
    import sys

    import narrowgate.analyses as analyses

    for name in ("prompts", "tasks"):
        monkeypatch.delitem(sys.modules, f"narrowgate.analyses.{name}", raising=False)
        if name in vars(analyses):  # (hasattr would ask the package's __getattr__, which warns)
            monkeypatch.delattr(analyses, name)


@pytest.mark.parametrize("name", ["prompts", "tasks"])
def test_moved_modules_still_import_by_every_old_spelling(name, old_module_paths_unimported):
    import importlib

    new = importlib.import_module(f"narrowgate.data.{name}")
    warns = rf"narrowgate\.analyses\.{name} is deprecated since narrowgate 0\.3\.0 .* use narrowgate\.data\.{name}"
    with pytest.warns(DeprecationWarning, match=warns):
        old = importlib.import_module(f"narrowgate.analyses.{name}")
    assert old is new and new.__spec__.name == f"narrowgate.data.{name}"  # one module, its own spec kept


def test_import_statements_of_old_module_paths_warn_at_the_users_line(old_module_paths_unimported):
    import narrowgate.data.prompts
    import narrowgate.data.tasks

    with pytest.warns(
        DeprecationWarning, match=r"narrowgate\.analyses\.tasks is deprecated.*narrowgate\.data\.tasks"
    ) as w:
        import narrowgate.analyses.tasks as tasks
    assert w[0].filename == __file__ and tasks is narrowgate.data.tasks
    with pytest.warns(DeprecationWarning, match=r"narrowgate\.analyses\.prompts is deprecated.*data\.prompts") as w:
        from narrowgate.analyses.prompts import VQA
    assert w[0].filename == __file__ and VQA is narrowgate.data.prompts.VQA


def test_attribute_access_to_a_moved_module_warns(old_module_paths_unimported):
    import narrowgate.analyses
    import narrowgate.data.prompts

    with pytest.warns(
        DeprecationWarning, match=r"narrowgate\.analyses\.prompts is deprecated.*narrowgate\.data\.prompts"
    ):
        assert narrowgate.analyses.prompts is narrowgate.data.prompts


def test_importing_the_package_and_the_cli_warns_about_nothing_moved():
    """The old module paths have no file: importing every experiment (pkgutil) and the CLI never warns."""
    import subprocess
    import sys

    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import narrowgate.analyses, narrowgate.cli, narrowgate.runner\n"
        "print([str(x.message) for x in w if 'narrowgate' in str(x.message)])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_errors_holds_errors_only_and_parses_nothing():
    """Option parsing left errors.py: what it defines is the error classes (the parsers are deprecated aliases)."""
    import inspect

    import narrowgate.errors as errors

    own = {name for name, value in vars(errors).items() if getattr(value, "__module__", None) == errors.__name__}
    assert own and all(
        inspect.isclass(vars(errors)[name]) and issubclass(vars(errors)[name], Exception) for name in own
    )
