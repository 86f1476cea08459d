"""MeanAblation equals a plain forward pre-hook that writes the mean into a stock float64 model's residual stream
(alone, among conditions over a shared prefix, in generation), and `MeanAblation.fit` equals the mean of the
model's own hidden states."""

from __future__ import annotations

import contextlib

import pytest
import torch

import narrowgate as ng
from narrowgate.interventions import MeanAblation
from tests.engine.conftest import same_prompt
from tests.fixtures.common import PROMPTS, images
from tests.interventions.conftest import role_window, windows

RESID = 1


@contextlib.contextmanager
def _ablating(model, layers, batch, role, mean):
    mask = batch.mask(role)
    with windows(model) as state:

        def pre(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rows = role_window(mask, role == "text", state["offset"], hidden.shape[1])
            new = torch.where(rows[..., None], mean.to(hidden.dtype), hidden)
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        handle = layers[RESID].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            yield model
        finally:
            handle.remove()


def _fitted(vlm, role):
    return MeanAblation.fit(vlm, [vlm.prepare(images(2, seed=s), PROMPTS) for s in (7, 8)], role, RESID)


def test_fit_is_the_mean_of_the_models_own_hidden_states(loaded, stock, family):
    vlm = loaded(family, dtype="float64")
    model = stock(family)
    rows = []
    for seed in (7, 8):
        batch = vlm.prepare(images(2, seed=seed), PROMPTS)
        with torch.no_grad():
            hs = model(**vlm.model_inputs(batch), output_hidden_states=True, use_cache=False).hidden_states
        rows.append(hs[RESID][batch.mask("internal_image")])
    want = torch.cat(rows).mean(0)
    torch.testing.assert_close(_fitted(vlm, "internal_image").mean, want, atol=1e-9, rtol=0)


@pytest.mark.parametrize("role", ["eoi", "text"])
def test_mean_ablation_equals_a_plain_hook(loaded, stock, family, role):
    vlm = loaded(family, dtype="float64")
    ablation = _fitted(vlm, role)
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    model = stock(family)
    layers = vlm.family.decoder_layers(model)
    got = vlm.forward(batch, interventions=[ablation]).logits
    with _ablating(model, layers, batch, role, ablation.mean), torch.no_grad():
        want = model(**vlm.model_inputs(batch), use_cache=False).logits
    keep = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-6, rtol=0)
    assert (got[keep] - vlm.forward(batch).logits[keep]).abs().max() > 1e-4

    tokens = vlm.generate(batch, interventions=[ablation], max_new_tokens=5)
    with _ablating(model, layers, batch, role, ablation.mean), torch.no_grad():
        want_tokens = model.generate(**vlm.model_inputs(batch), max_new_tokens=5, **vlm._gen_kwargs({}))
    assert torch.equal(tokens, want_tokens.cpu())


def test_mean_ablation_among_conditions_over_a_shared_prefix(loaded, stock, family):
    vlm = loaded(family, dtype="float64")
    batch = same_prompt(vlm)
    ablations = {role: _fitted(vlm, role) for role in ("eoi", "last")}
    got = vlm.forward_conditions(batch, {"baseline": [], **{r: [a] for r, a in ablations.items()}})
    model = stock(family)
    for role, ablation in ablations.items():
        with _ablating(model, vlm.family.decoder_layers(model), batch, role, ablation.mean), torch.no_grad():
            want = model(**vlm.model_inputs(batch), use_cache=False).logits[:, -1]
        torch.testing.assert_close(got[role].last_logits, want.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(got["baseline"].last_logits, vlm.forward(batch).logits[:, -1].float(), atol=1e-6, rtol=0)


def test_mean_ablation_refuses_a_mean_of_the_wrong_size(loaded):
    vlm = loaded("llava")
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    with pytest.raises(ng.InterventionError, match="features"):
        vlm.forward(batch, interventions=[MeanAblation("eoi", 1, torch.zeros(vlm.hidden_size - 1))])
    with pytest.raises(ValueError, match="hidden_size"):
        MeanAblation("eoi", 1, torch.zeros(2, vlm.hidden_size))
