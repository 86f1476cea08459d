"""Shared-prefix execution equals full recomputation, for forwards and for generation."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import Blip2ForConditionalGeneration

import narrowgate as ng
from narrowgate import compat
from narrowgate.engine import shared as shared_prefix
from narrowgate.engine.shared import Condition, prefix_length
from tests.engine.conftest import same_prompt


def _conditions(vlm, batch):
    base = vlm.forward(batch, capture=ng.Capture("eoi"))
    other = base.residuals["eoi"].flip(0)
    return [
        Condition("baseline"),
        Condition("eoi->text", knockouts=(ng.Knockout("eoi", "text"),)),
        Condition("image->text", knockouts=(ng.Knockout("image", "text", mode="mask"),)),
        Condition("last_image->text", knockouts=(ng.Knockout("last_image", "text"),)),
        Condition("eoi->eoi+text", knockouts=(ng.Knockout("eoi", ("eoi", "text")),)),
        Condition("patch", patches=(ng.Patch("eoi", vlm.n_layers // 2, other[:, vlm.n_layers // 2]),)),
    ]


@pytest.fixture(params=["same-prompt", "mixed"])
def case(request, loaded, family, mixed):
    """Same-prompt rows share a prefix; rows whose images end at different positions fall back to full runs."""
    if request.param == "mixed":
        return mixed
    vlm = loaded(family)
    batch = same_prompt(vlm)
    assert prefix_length(batch, _conditions(vlm, batch), attention_stats=True) > max(l.end for l in batch.layouts)
    return vlm, batch


def test_a_forward_that_requires_the_image_runs_every_condition_in_full(loaded, monkeypatch):
    """BLIP-2's forward requires pixel_values, so no suffix runs without the image: the conditions run in full
    (equal to separate forwards) and an explicit shared prefix is refused by name."""
    params = inspect.signature(Blip2ForConditionalGeneration.forward).parameters
    assert params["pixel_values"].default is params["pixel_values"].empty  # the case this test stands for
    vlm = loaded("llava")
    batch = same_prompt(vlm)
    assert vlm._suffix_without_image  # llava's forward runs without pixel_values
    monkeypatch.setattr(vlm, "_suffix_without_image", False)
    monkeypatch.setattr(vlm.runner, "suffix_pass", None)  # any suffix pass would fail
    conds = _conditions(vlm, batch)
    out = vlm.forward_conditions(batch, conds)
    for c in conds:
        full = vlm.forward(batch, knockouts=c.knockouts, patches=c.patches)
        torch.testing.assert_close(out[c.name].last_logits, full.logits[:, -1].float(), atol=1e-5, rtol=0)
    with pytest.raises(ng.InterventionError, match="requires pixel_values"):
        vlm.share_prefix(batch, batch.length - 1)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-prefix", "prefix-by-hand"])
@pytest.mark.parametrize("per_pass", [None, 2], ids=["one-pass", "two-per-pass"])
def test_shared_forward_equals_separate_forwards(case, per_pass, fused, monkeypatch):
    """Also when the conditions are split into several suffix passes (as a large scan is), and with the prefix
    part computed by hand (accelerators, soft-capping) instead of by PyTorch's fused CPU attention."""
    vlm, batch = case
    if per_pass:
        monkeypatch.setattr(vlm.runner, "pass_size", lambda *args, **kwargs: per_pass)
    if not fused:
        monkeypatch.setattr(compat, "flash_cpu", None)
    conds = _conditions(vlm, batch)
    capture = ng.Capture(("last_image", "eoi", "last"))
    shared = vlm.forward_conditions(batch, conds, capture=capture, attention_stats=True)
    for c in conds:
        full = vlm.forward(batch, knockouts=c.knockouts, patches=c.patches, capture=capture, attention_stats=True)
        got = shared[c.name]
        torch.testing.assert_close(got.last_logits, full.logits[:, -1].float(), atol=1e-5, rtol=0)
        for role in ("last_image", "eoi", "last"):
            torch.testing.assert_close(got.residuals[role], full.residuals[role], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            got.cross_modal_attention.fractions, full.cross_modal_attention.fractions, atol=1e-5, rtol=0, equal_nan=True
        )


def test_shared_generation_equals_separate_generation(case):
    vlm, batch = case
    conds = _conditions(vlm, batch)
    shared = vlm.generate_conditions(batch, conds, max_new_tokens=5)
    for c in conds:
        plan = vlm._plan(batch, c.knockouts, c.patches, None, False)
        full = vlm._generate_plans(batch, [plan], 0, 5, {})[0]  # nothing shared: interventions over the whole prompt
        assert torch.equal(shared[c.name], full), c.name
        if c.knockouts or c.patches:
            assert torch.equal(vlm.generate(batch, knockouts=c.knockouts, patches=c.patches, max_new_tokens=5), full)


def test_condition_touching_the_image_falls_back_to_full_runs(mixed):
    vlm, batch = mixed
    conds = [Condition("baseline"), Condition("img", knockouts=(ng.Knockout("image", "image", mode="mask"),))]
    assert prefix_length(batch, conds, attention_stats=False) == 0
    out = vlm.forward_conditions(batch, conds)
    full = vlm.forward(batch, knockouts=conds[1].knockouts)
    torch.testing.assert_close(out["img"].last_logits, full.logits[:, -1].float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-prefix", "prefix-by-hand"])
def test_text_blind_to_the_whole_prefix_equals_full_forward(loaded, fused, monkeypatch):
    """Text rows whose every prefix key is knocked out (mask mode) attend to the text only: the prefix part of the
    shared-prefix attention is empty for them and must weigh nothing."""
    if not fused:
        monkeypatch.setattr(compat, "flash_cpu", None)
    vlm = loaded("chameleon")  # image first: everything before the text is bos and the image
    batch = same_prompt(vlm)
    blind = ng.Knockout(("bos", "boi", "image", "eoi"), "text", mode="mask")
    conds = [Condition("baseline"), Condition("blind", knockouts=(blind,))]
    first_text = prefix_length(batch, conds, attention_stats=False)
    assert first_text == int(batch.mask("text").any(0).nonzero().min())
    assert batch.mask(blind.sources)[:, :first_text].all()  # every prefix key is blocked for the text
    got = vlm.forward_conditions(batch, conds)
    for c in conds:
        full = vlm.forward(batch, knockouts=c.knockouts).logits[:, -1].float()
        torch.testing.assert_close(got[c.name].last_logits, full, atol=1e-5, rtol=0)
    assert (got["blind"].last_logits - got["baseline"].last_logits).abs().max() > 1e-4


def test_dense_rows_of_a_sparse_mask_equal_the_dense_rows():
    """Uncoalesced entries, several per row, rows without any: each slice equals the dense tensor's."""
    dense = torch.rand(9, 2, 7) < 0.3
    dense[4] = False
    at = dense.nonzero().flip(0).T  # reversed: not sorted, as a caller may build it
    sparse = torch.sparse_coo_tensor(at, torch.ones(at.shape[1], dtype=torch.bool), dense.shape, check_invariants=True)
    for start, stop in ((0, 9), (0, 1), (3, 6), (4, 5), (8, 9)):
        assert torch.equal(shared_prefix.dense_rows(sparse, start, stop), dense[start:stop])


def test_the_shared_prefix_holds_no_autograd_graph(loaded):
    """Called with autograd on (as an analysis's process does), the prefix keeps no graph: a graph would hold every
    layer's activations of the prefix pass for as long as the prefix lives."""
    vlm = loaded("chameleon")
    batch = same_prompt(vlm)
    assert torch.is_grad_enabled() and any(p.requires_grad for p in vlm.model.parameters())
    prefix = vlm.share_prefix(batch, max(lay.end for lay in batch.layouts) + 1)
    assert all(k.grad_fn is None and v.grad_fn is None and not k.requires_grad for k, v in prefix.kv)
