"""Gate scan: batched single-position knockouts equal separate forwards, a planted gate is found (and none
on an unmodified model), and the attribution estimate equals the first-order derivative taken by autograd."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AttentionInterface, ChameleonForConditionalGeneration

import narrowgate as ng
from narrowgate import compat
from narrowgate.analyses import EXPERIMENTS
from narrowgate.analyses.base import run
from narrowgate.analyses.gate_scan import kl, side_positions
from narrowgate.engine.state import ResolvedKnockout, RoleMask
from narrowgate.vlm import VLM
from tests.fixtures import chameleon
from tests.fixtures.common import images

PROMPT = "This shape is a"


def _scan_cfg(ckpt, out, **extra):
    return dict(model=str(ckpt), data="synthetic", out=str(out), n_per_class=1, progress=False, bootstrap=200, **extra)


@pytest.mark.parametrize("family", ["chameleon", "llava"])
@pytest.mark.parametrize("mode", ["mask", "zero"])
@pytest.mark.parametrize("per_pass", [None, 7], ids=["one-pass-fused", "seven-per-pass-by-hand"])
def test_scan_damage_equals_separate_single_knockout_forwards(loaded, family, mode, per_pass, monkeypatch):
    vlm = loaded(family)
    if per_pass:  # a real scan runs in many suffix passes; on an accelerator the prefix part is computed by hand
        monkeypatch.setattr(vlm, "_pass_size", lambda *args, **kwargs: per_pass)
        monkeypatch.setattr(compat, "flash_cpu", None)
    batch = vlm.prepare(images(1, seed=3), [PROMPT])
    lay = batch.layouts[0]
    side = side_positions(lay)
    prefix = vlm.share_prefix(batch, lay.eoi + 1)
    sources = torch.zeros(len(side) + 1, 1, batch.length, dtype=torch.bool)
    for i, (p, _, _) in enumerate(side):
        sources[i + 1, 0, p] = True
    logits = vlm.forward_knockouts(prefix, sources, mode=mode)[:, 0]
    base = vlm.forward(batch).logits[0, -1].float()
    torch.testing.assert_close(logits[0], base, atol=1e-5, rtol=0)
    for i, (_, name, role) in enumerate(side):
        source = name if role in ("boi", "eoi", "image_content") else None
        if source is None:
            continue
        full = vlm.forward(batch, knockouts=[ng.Knockout(source, "text", mode=mode)]).logits[0, -1].float()
        torch.testing.assert_close(logits[i + 1], full, atol=1e-5, rtol=0)
        torch.testing.assert_close(kl(base, logits[i + 1]), kl(base, full), atol=1e-5, rtol=0)
    # one pass with a layer window per knockout equals separate forwards with those windows
    eoi = len(side)
    windows = [(0,), (1, 2), None]
    got = vlm.forward_knockouts(prefix, sources[[eoi, eoi, eoi]], layers=windows, mode=mode)[:, 0]
    for w, g in zip(windows, got):
        full = vlm.forward(batch, knockouts=[ng.Knockout("eoi", "text", layers=w, mode=mode)]).logits[0, -1].float()
        torch.testing.assert_close(g, full, atol=1e-5, rtol=0)


class Planted(VLM):
    """A VLM whose text can read one image-side position only: every other one is masked from the text."""

    keep: int = 0

    def _suffix_pass(self, prefix, plan, n, keep=1):
        batch = prefix.batch
        lay = batch.layouts[0]
        blocked = torch.zeros(batch.size, batch.length, dtype=torch.bool)
        blocked[:, [p for p, _, _ in side_positions(lay) if p != self.keep]] = True
        text = batch.mask("text")
        planted = ResolvedKnockout(
            RoleMask(blocked.repeat(n, 1), False), RoleMask(text.repeat(n, 1), True), None, "mask"
        )
        return super()._suffix_pass(prefix, dataclasses.replace(plan, knockouts=(*plan.knockouts, planted)), n, keep)


def test_planted_gate_is_found_and_an_unmodified_model_has_none(checkpoint_dir, loaded, tmp_path):
    ckpt = checkpoint_dir("chameleon")
    vlm = loaded("chameleon")
    planted = Planted(vlm.model, vlm.processor)
    lay = vlm.prepare(images(1), [PROMPT]).layouts[0]
    planted.keep = lay.content[7]  # image[7], an ordinary image token
    store = run(EXPERIMENTS["gate-scan"](), _scan_cfg(ckpt, tmp_path / "planted"), vlm=planted, command=["t"])
    gate, positions = store.tables()["gate"].iloc[0], store.tables()["positions"]
    assert positions["position"].iloc[0] == "image[7]" and gate["top_position"] == "image[7]"
    assert gate["gate_index"] >= 0.9 and gate["positions_for_90"] == 1
    assert "narrow gate" in gate["verdict"]
    assert gate["whole_except_top_damage"] < 1e-6 * max(gate["whole_damage"], 1.0)  # nothing else is read

    store = run(EXPERIMENTS["gate-scan"](), _scan_cfg(ckpt, tmp_path / "plain"), vlm=vlm, command=["t"])
    gate = store.tables()["gate"].iloc[0]
    assert gate["whole_damage"] > 1e-4  # the text does read the image
    assert gate["gate_index"] < 0.9 and gate["positions_for_90"] > 1
    assert "narrow gate" not in gate["verdict"]
    figure = store.path / "figures" / "gate_scan.png"
    assert figure.stat().st_size > 1000


def _interpolating_attention(state):
    """Eager attention whose text rows use A + t (A' - A), A' = A with column j knocked out (mask mode)."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        T = query.shape[2]
        scores = query @ k.transpose(2, 3) * scaling
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        A = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
        blocked = torch.zeros(T, T, dtype=torch.bool)
        blocked[state["text"] :, state["j"]] = True
        kept = A.masked_fill(blocked, 0.0)
        knocked = kept / kept.sum(-1, keepdim=True)
        A = A + state["t"] * (knocked - A)
        return (A @ v).transpose(1, 2).contiguous(), A

    return attention


def test_attribution_equals_first_order_derivative_by_autograd(tmp_path):
    path = chameleon.build(tmp_path / "two-layer", layers=2)
    vlm = ng.load(path, dtype="float32")
    batch = vlm.prepare(images(1, seed=5), [PROMPT])
    lay = batch.layouts[0]
    est, top = vlm.attribute(vlm.share_prefix(batch, lay.eoi + 1))

    state = {"t": torch.zeros((), requires_grad=True), "j": 0, "text": lay.eoi + 1}
    AttentionInterface.register("test_interpolate", _interpolating_attention(state))
    model = ChameleonForConditionalGeneration.from_pretrained(path, attn_implementation="test_interpolate").eval()
    inputs = {k: v for k, v in batch.inputs.items()}
    for p, name, _ in side_positions(lay):
        state["j"] = p
        logits = model(**inputs).logits[0, -1]
        metric = torch.log_softmax(logits.float(), -1)[int(top[0])]
        (derivative,) = torch.autograd.grad(metric, state["t"])
        torch.testing.assert_close(est[0, p], derivative.detach(), atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("mode", ["mask", "zero"])
def test_generation_under_position_knockouts_equals_role_knockouts(loaded, mode):
    vlm = loaded("chameleon")
    batch = vlm.prepare(images(2, seed=5), [PROMPT, PROMPT + " small"])
    side = [side_positions(lay) for lay in batch.layouts]
    roles = {"eoi": ("eoi",), "image[3]": ("image[3]",), "whole": ("boi", "image", "eoi")}
    masks = torch.zeros(4, 2, batch.length, dtype=torch.bool)
    for b, lay in enumerate(batch.layouts):
        masks[1, b, lay.eoi] = True
        masks[2, b, lay.content[3]] = True
        masks[3, b, [p for p, _, _ in side[b]]] = True
    got = vlm.generate_knockouts(batch, masks, mode=mode, max_new_tokens=4)
    assert torch.equal(got[0], vlm.generate(batch, max_new_tokens=4))
    for g, source in zip(got[1:], roles.values()):
        want = vlm.generate(batch, knockouts=[ng.Knockout(source, "text", mode=mode)], max_new_tokens=4)
        assert torch.equal(g, want)


def test_score_gives_every_position_its_task_score_drop(checkpoint_dir, loaded, tmp_path):
    from narrowgate.analyses import tasks
    from narrowgate.metrics import vqa_accuracy

    ckpt = checkpoint_dir("chameleon")
    with pytest.raises(ng.NarrowgateError, match="--score needs a generative task"):
        run(
            EXPERIMENTS["gate-scan"](),
            _scan_cfg(ckpt, tmp_path / "classes", score=True),
            vlm=loaded("chameleon"),
            command=["t"],
        )
    cfg = dict(_scan_cfg(ckpt, tmp_path / "vqa", score=True, task="vqa", max_new_tokens=3), n=3, n_per_class=None)
    store = run(EXPERIMENTS["gate-scan"](), cfg, vlm=loaded("chameleon"), command=["t"])
    positions, gate = store.tables()["positions"], store.tables()["gate"].iloc[0]
    rows = store.records().rows
    assert positions["score_drop"].notna().all() and gate["score_metric"] == "vqa_accuracy"
    examples = {e.id: e for e in tasks.load("synthetic", "vqa", None, n=3, seed=42)}
    acc = {
        i: [vqa_accuracy(t, examples[i].answers) for t in r["texts"]]
        for i, (_, r) in zip(rows["example_id"], rows.iterrows())
    }
    assert gate["score_baseline"] == pytest.approx(sum(a[0] for a in acc.values()) / 3)
    assert gate["score_whole_image"] == pytest.approx(sum(a[-1] for a in acc.values()) / 3)
    eoi = rows.iloc[0]["positions"].tolist().index("eoi")
    want = sum(a[0] - a[1 + eoi] for a in acc.values()) / 3
    assert positions.set_index("position").loc["eoi", "score_drop"] == pytest.approx(want)
