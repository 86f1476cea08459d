"""Cross-modal attention (Eq. 1) from text rows only, against full eager attention maps."""

from __future__ import annotations

import pytest
import torch

import narrowgate as ng


def _reference_fractions(attentions, batch, b):
    lay = batch.layouts[b]
    pre = list(range(lay.start, lay.end + 1)) + [lay.eoi]
    text = batch.positions("text")[b]
    out = []
    for a in attentions:  # [B, H, T, T]
        c = a[b][:, text][:, :, pre].double().mean(1).sum(0)
        out.append(c / c.sum())
    return torch.stack(out), pre


@pytest.mark.parametrize("knockout", [None, "eoi-zero"])
def test_cross_modal_attention_matches_eager_maps(loaded, family, knockout):
    vlm, eager = loaded(family), loaded(family, attn="eager")
    from tests.fixtures.common import PROMPTS, images

    batch = vlm.prepare(images(2, seed=3), PROMPTS)
    kos = [ng.Knockout("eoi", "text", layers=(1,))] if knockout else []
    cma = vlm.forward(batch, attention_stats=True, knockouts=kos).cross_modal_attention
    with torch.no_grad():
        from narrowgate.engine.state import Run, activate, resolve

        plan = resolve(batch, layer_of=eager.layer_of, n_layers=eager.n_layers, knockouts=kos)
        with activate(Run(plan)):
            att = eager.model(**eager.model_inputs(batch), output_attentions=True, use_cache=False).attentions
    att = att[-eager.n_layers :]  # decoder layers only (some models also return vision attentions)
    assert len(att) == vlm.n_layers
    for b in range(batch.size):
        ref, pre = _reference_fractions(att, batch, b)
        n = len(pre)
        assert cma.positions[b, :n].tolist() == pre
        torch.testing.assert_close(cma.fractions[b, :, :n].double(), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(cma.fractions[b, :, :n].sum(-1), torch.ones(vlm.n_layers), atol=1e-5, rtol=0)
        assert cma.labels[b][-1] == "eoi" and cma.labels[b][pre.index(batch.layouts[b].content[0])] == "image[0]"
    if knockout:
        assert cma.share("eoi")[:, 1].abs().max() < 1e-7  # the knocked-out layer gives eoi nothing
    shares = cma.share("eoi") + cma.share("image")
    torch.testing.assert_close(shares, torch.ones_like(shares), atol=1e-5, rtol=0)
