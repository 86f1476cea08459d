"""AddVector equals a plain forward pre-hook that adds the vector on a stock float64 model: alone, among
conditions over a shared prefix, and in generation (where every new token is text)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import narrowgate as ng
from narrowgate.interventions import AddVector
from tests.engine.conftest import same_prompt
from tests.fixtures.common import PROMPTS, images
from tests.interventions.conftest import role_window, windows

RESID = 1


def _vector(vlm, per_example: bool, batch_size: int):
    g = torch.Generator().manual_seed(3)
    shape = (batch_size, vlm.hidden_size) if per_example else (vlm.hidden_size,)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@contextlib.contextmanager
def _adding(model, layers, batch, vector, scale):
    """The reference: a pre-hook on decoder layer RESID adding ``scale * vector`` at the text positions."""
    mask = batch.mask("text")
    vec = vector if vector.dim() == 2 else vector[None].expand(batch.size, -1)
    with windows(model) as state:

        def pre(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rows = role_window(mask, True, state["offset"], hidden.shape[1])
            new = hidden + scale * rows[..., None].to(hidden.dtype) * vec[:, None].to(hidden.dtype)
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        handle = layers[RESID].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            yield model
        finally:
            handle.remove()


@pytest.mark.parametrize("per_example", [False, True], ids=["one-vector", "per-example"])
def test_add_vector_equals_a_plain_hook(loaded, stock, family, per_example):
    vlm = loaded(family, dtype="float64")
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    vector = _vector(vlm, per_example, batch.size)
    model = stock(family)
    got = vlm.forward(batch, interventions=[AddVector("text", RESID, vector, scale=0.5)]).logits
    with _adding(model, vlm.family.decoder_layers(model), batch, vector, 0.5), torch.no_grad():
        want = model(**vlm.model_inputs(batch), use_cache=False).logits
    keep = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-6, rtol=0)
    assert (got[keep] - vlm.forward(batch).logits[keep]).abs().max() > 1e-4

    tokens = vlm.generate(batch, interventions=[AddVector("text", RESID, vector, scale=0.5)], max_new_tokens=5)
    with _adding(model, vlm.family.decoder_layers(model), batch, vector, 0.5), torch.no_grad():
        want_tokens = model.generate(**vlm.model_inputs(batch), max_new_tokens=5, **vlm._gen_kwargs({}))
    assert torch.equal(tokens, want_tokens.cpu())


def test_add_vector_among_conditions_over_a_shared_prefix(loaded, stock, family):
    vlm = loaded(family, dtype="float64")
    batch = same_prompt(vlm)
    vector = _vector(vlm, False, batch.size)
    conds = {"baseline": [], **{f"scale {s}": [AddVector("text", RESID, vector, scale=s)] for s in (0.5, -1.0)}}
    got = vlm.forward_conditions(batch, conds)
    model = stock(family)
    for scale in (0.5, -1.0):
        with _adding(model, vlm.family.decoder_layers(model), batch, vector, scale), torch.no_grad():
            want = model(**vlm.model_inputs(batch), use_cache=False).logits[:, -1]
        torch.testing.assert_close(got[f"scale {scale}"].last_logits, want.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(got["baseline"].last_logits, vlm.forward(batch).logits[:, -1].float(), atol=1e-6, rtol=0)


def test_add_vector_refuses_a_vector_of_the_wrong_size(loaded):
    vlm = loaded("llava")
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    with pytest.raises(ng.InterventionError, match="features"):
        vlm.forward(batch, interventions=[AddVector("text", 1, torch.zeros(vlm.hidden_size + 1))])
    with pytest.raises(ng.InterventionError, match="3 vectors for a batch of 2"):
        vlm.forward(batch, interventions=[AddVector("text", 1, torch.zeros(3, vlm.hidden_size))])
