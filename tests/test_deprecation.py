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
