"""Gate scan: batched single-position knockouts equal separate forwards, a planted gate is found (and none
on an unmodified model), and the attribution estimate equals the first-order derivative taken by autograd."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, ChameleonForConditionalGeneration

import narrowgate as ng
from narrowgate import compat
from narrowgate.analyses import EXPERIMENTS
from narrowgate.analyses.gate_scan import scan_positions, side_positions
from narrowgate.engine.runner import Runner
from narrowgate.engine.state import ResolvedKnockout, RoleMask
from narrowgate.metrics.scores import kl
from narrowgate.runner import run, settings_of
from narrowgate.vlm import VLM
from tests.fixtures import chameleon
from tests.fixtures.common import images

PROMPT = "This shape is a"


def _scan_cfg(ckpt, out, **extra):
    cfg = dict(model=str(ckpt), data="synthetic", out=str(out), n_per_class=2, progress=False, bootstrap=200)
    return cfg | extra


@pytest.mark.parametrize("family", ["chameleon", "llava"])
@pytest.mark.parametrize("mode", ["mask", "zero"])
@pytest.mark.parametrize("per_pass", [None, 7], ids=["one-pass-fused", "seven-per-pass-by-hand"])
def test_scan_damage_equals_separate_single_knockout_forwards(loaded, family, mode, per_pass, monkeypatch):
    vlm = loaded(family)
    if per_pass:  # a real scan runs in many suffix passes; on an accelerator the prefix part is computed by hand
        monkeypatch.setattr(vlm.runner, "pass_size", lambda *args, **kwargs: per_pass)
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


class PlantedRunner(Runner):
    """Suffix passes in which the text can read one image-side position only: every other one is masked from it."""

    keep: int = 0

    def suffix_pass(self, prefix, plan, n, keep=1):
        batch = prefix.batch
        blocked = torch.zeros(batch.size, batch.length, dtype=torch.bool)
        for b in range(batch.size):
            blocked[b, [p for p, _, _ in scan_positions(batch, b)[0] if p != self.keep]] = True
        text = batch.mask("text")
        planted = ResolvedKnockout(
            RoleMask(blocked.repeat(n, 1), False), RoleMask(text.repeat(n, 1), True), None, "mask"
        )
        return super().suffix_pass(prefix, dataclasses.replace(plan, knockouts=(*plan.knockouts, planted)), n, keep)


class Planted(VLM):
    """A VLM whose text can read one image-side position only (`PlantedRunner`)."""

    def __init__(self, model, processor):
        super().__init__(model, processor)
        self.runner = PlantedRunner(self)

    @property
    def keep(self) -> int:
        return self.runner.keep

    @keep.setter
    def keep(self, position: int) -> None:
        self.runner.keep = position


@pytest.mark.slow
def test_planted_gate_is_found_and_an_unmodified_model_has_none(checkpoint_dir, loaded, tmp_path):
    ckpt = checkpoint_dir("chameleon")
    vlm = loaded("chameleon")
    planted = Planted(vlm.model, vlm.processor)
    lay = vlm.prepare(images(1), [PROMPT]).layouts[0]
    planted.keep = lay.content[7]  # image[7], an ordinary image token
    # A tiny random model barely reads its image: the default floor (0.01 nats) gives no verdict.
    store = run(EXPERIMENTS["gate-scan"](), _scan_cfg(ckpt, tmp_path / "floor"), vlm=planted, command=["t"])
    gate = store.tables()["gate"].iloc[0]
    assert gate["whole_damage"] < gate["floor"] == 0.01 and gate["verdict"].startswith("no verdict")
    assert "below the floor" in gate["verdict"] and np.isfinite(gate["gate_index"])  # the numbers stay
    cfg = _scan_cfg(ckpt, tmp_path / "planted", floor=1e-4)
    store = run(EXPERIMENTS["gate-scan"](), cfg, vlm=planted, command=["t"])
    gate, positions = store.tables()["gate"].iloc[0], store.tables()["positions"]
    assert positions["position"].iloc[0] == "image[7]" and gate["top_position"] == "image[7]"
    assert gate["gate_index"] >= 0.9 and gate["positions_for_90"] == 1 and gate["top_stability"] == 1
    # everything but image[7] knocked out is what the planted model sees anyway: sufficient, exactly
    assert gate["sufficiency"] == pytest.approx(1.0, abs=1e-6) and gate["sufficiency_low"] >= 1 - 1e-6
    assert positions.set_index("position").loc["image[7]", "sufficiency"] == pytest.approx(1.0, abs=1e-6)
    assert gate["verdict"].startswith("a narrow gate at image[7]")
    assert gate["whole_except_top_damage"] < 1e-6 * max(gate["whole_damage"], 1.0)  # nothing else is read
    assert gate["gate_index_mask"] == gate["gate_index"] and np.isfinite(gate["gate_index_zero"])
    assert "damage_zero" in positions

    store = run(EXPERIMENTS["gate-scan"](), _scan_cfg(ckpt, tmp_path / "plain", floor=1e-4), vlm=vlm, command=["t"])
    gate = store.tables()["gate"].iloc[0]
    assert gate["whole_damage"] > 1e-4  # the text does read the image
    assert gate["gate_index"] < 0.9 and gate["positions_for_90"] > 1 and gate["sufficiency"] < 0.9
    assert "narrow gate" not in gate["verdict"]
    figure = store.path / "figures" / "gate_scan.png"
    assert figure.stat().st_size > 1000


@pytest.mark.slow
def test_several_images_are_scanned_and_summed_up_per_image(checkpoint_dir, loaded, tmp_path):
    """--images 2 on a model whose text reads image 1's eoi only: the scan finds eoi@1 over both images' positions,
    gate_by_image gives image 1 its gate there (necessity and sufficiency 1, all of the image side's damage) and
    image 2 no verdict (knocking it out changes nothing); every position carries its image."""
    ckpt = checkpoint_dir("chameleon")
    planted = Planted(loaded("chameleon").model, loaded("chameleon").processor)
    batch = planted.prepare([images(2)], [PROMPT])
    planted.keep = int(batch.index("eoi@1")[0])
    cfg = _scan_cfg(ckpt, tmp_path / "two", floor=1e-4, images=2, n_per_class=4)
    store = run(EXPERIMENTS["gate-scan"](), cfg, vlm=planted, command=["t"])
    tables = store.tables()
    gate, by_image, positions = tables["gate"].iloc[0], tables["gate_by_image"], tables["positions"]
    assert gate["n_exact"] == 12 and gate["top_position"] == "eoi@1" and gate["verdict"].startswith("a narrow gate")
    assert by_image["image"].tolist() == [1, 2] and (by_image["n"] == 12).all()
    one, two = by_image.iloc[0], by_image.iloc[1]
    assert one["top_position"] == "eoi@1" and one["gate_index"] >= 0.999 and one["sufficiency"] == pytest.approx(1.0)
    assert one["share_of_whole"] == pytest.approx(1.0, abs=1e-6) and one["verdict"].startswith("a narrow gate at eoi@1")
    assert two["whole_damage"] < 1e-9 and two["verdict"].startswith("no verdict: knocking out image 2 whole")
    side = scan_positions(batch)[0]
    assert one["positions"] + two["positions"] == len(side)
    group = positions.set_index("position")["image"]
    assert group["eoi@1"] == 1 and group["boi@2"] == 2 and group["image@2[0]"] == 2 and set(group) == {1, 2}
    assert store.path.joinpath("figures", "gate_scan.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_clip_is_scanned_frame_by_frame(checkpoint_dir, loaded, tmp_path):
    """--frames 4 on LLaVA-OneVision: the positions are the clip's frames' tokens (frame@t[k]) and its newline and
    eoi; each position's damage is KL(baseline || its knockout) of separate forwards; gate_by_frame has a row per
    frame with the frame knocked out whole."""
    vlm = loaded("llava_onevision")
    cfg = _scan_cfg(checkpoint_dir("llava_onevision"), tmp_path / "clip", frames=4, n_per_class=7, per_example=True)
    store = run(EXPERIMENTS["gate-scan"](), cfg, vlm=vlm, command=["t"])
    tables = store.tables()
    by_frame, per = tables["gate_by_frame"], tables["positions_by_example"]
    assert by_frame["frame"].tolist() == [1, 2, 3, 4] and (by_frame["positions"] == 4).all()
    assert set(tables["positions"]["position"]) == {f"frame@{t}[{k}]" for t in range(1, 5) for k in range(4)} | {
        "eol[0]",
        "eoi",
    }
    first = store.records().rows.iloc[0]
    scan = EXPERIMENTS["gate-scan"]()
    examples = {e.id: e for e in scan.examples(settings_of(scan, cfg))}
    clip = ng.Video([examples[i].load_image() for i in first["example_id"].split("+")])
    batch = vlm.prepare([clip], [PROMPT])
    base = vlm.forward(batch).logits[0, -1].float()
    mine = per[per["example_id"] == first["example_id"]].set_index("position")["damage"]
    for name in ("frame@2[1]", "frame@4[3]", "eoi"):
        full = vlm.forward(batch, knockouts=[ng.Knockout(name, "text", mode="mask")]).logits[0, -1].float()
        assert mine[name] == pytest.approx(float(kl(base, full)), abs=1e-6)
    whole = vlm.forward(batch, knockouts=[ng.Knockout("frame@3", "text", mode="mask")]).logits[0, -1].float()
    assert first["group_whole"][2] == pytest.approx(float(kl(base, whole)), abs=1e-6)


def test_images_and_frames_together_are_refused(checkpoint_dir, tmp_path):
    with pytest.raises(ng.NarrowgateError, match="--images or --frames, not both"):
        run(EXPERIMENTS["gate-scan"](), _scan_cfg(checkpoint_dir("chameleon"), tmp_path / "x", images=2, frames=2))


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


@pytest.mark.slow
def test_score_gives_every_position_its_task_score_drop(checkpoint_dir, loaded, tmp_path):
    from narrowgate.data import tasks
    from narrowgate.metrics import vqa_accuracy

    ckpt = checkpoint_dir("chameleon")
    with pytest.raises(ng.NarrowgateError, match="--score needs a generative task"):
        run(
            EXPERIMENTS["gate-scan"](),
            _scan_cfg(ckpt, tmp_path / "classes", score=True),
            vlm=loaded("chameleon"),
            command=["t"],
        )
    cfg = dict(_scan_cfg(ckpt, tmp_path / "vqa", score=True, task="vqa", max_new_tokens=3), n=10, n_per_class=None)
    store = run(EXPERIMENTS["gate-scan"](), cfg, vlm=loaded("chameleon"), command=["t"])
    positions, gate = store.tables()["positions"], store.tables()["gate"].iloc[0]
    rows = store.records().rows
    assert positions["score_drop"].notna().all() and gate["score_metric"] == "vqa_accuracy"
    examples = {e.id: e for e in tasks.load("synthetic", "vqa", None, n=10, seed=42)}
    acc = {
        i: [vqa_accuracy(t, examples[i].answers) for t in r["texts"]]
        for i, (_, r) in zip(rows["example_id"], rows.iterrows())
    }
    assert gate["score_baseline"] == pytest.approx(sum(a[0] for a in acc.values()) / 10)
    assert gate["score_whole_image"] == pytest.approx(sum(a[-1] for a in acc.values()) / 10)
    eoi = rows.iloc[0]["positions"].tolist().index("eoi")
    want = sum(a[0] - a[1 + eoi] for a in acc.values()) / 10
    assert positions.set_index("position").loc["eoi", "score_drop"] == pytest.approx(want)


def _hand_split_half(D, W, R, seed):
    """The split-half point estimate of docs/gate-scan.md, in plain Python loops (an independent reference)."""
    E, P = len(D), len(D[0])
    perm = np.random.default_rng(seed).permutation(E)
    halves = [list(perm[: E // 2]), list(perm[E // 2 :])]

    def mean(rows, col, M):
        vals = [M[i][col] for i in rows if not math.isnan(M[i][col])]
        return sum(vals) / len(vals) if vals else float("nan")

    nec, suf = [], []
    for pick, score in (halves, halves[::-1]):
        means = [mean(pick, j, D) for j in range(P)]
        top = max(range(P), key=lambda j: -math.inf if math.isnan(means[j]) else means[j])
        w = sum(W[i] for i in score) / len(score)
        nec.append(mean(score, top, D) / w)
        suf.append(1 - mean(score, top, R) / w)
    return sum(nec) / 2, sum(suf) / 2


def test_split_half_estimate_equals_a_hand_computation():
    from narrowgate.analyses.gate_scan import _split_half

    gen = np.random.default_rng(7)
    E, P = 14, 6
    D = gen.gamma(1.0, 1.0, (E, P))
    D[:, 2] += 3.0  # position 2 dominates on every example
    D[3, 4] = D[9, 1] = np.nan  # examples whose image lacks a position
    W = np.nansum(D[:, [0, 1, 2, 3, 5]], 1) + gen.uniform(0, 1, E)
    R = gen.uniform(0, 1, (E, P)) * W[:, None]
    Do, Wo = D * 0.5, W * 0.7
    names = [f"p{j}" for j in range(P)]
    got = _split_half(D, W, R, Do, Wo, names, 2, "mask", "zero", np.random.default_rng(0), 400)
    want_nec, want_suf = _hand_split_half(D.tolist(), W.tolist(), R.tolist(), seed=0)
    assert got["gate_index"] == pytest.approx(want_nec) and got["gate_index_mask"] == got["gate_index"]
    assert got["sufficiency"] == pytest.approx(want_suf)
    zero_nec, _ = _hand_split_half(Do.tolist(), Wo.tolist(), R.tolist(), seed=0)
    assert got["gate_index_zero"] == pytest.approx(zero_nec)
    assert got["gate_low"] <= got["gate_index"] <= got["gate_high"] and got["gate_low"] < got["gate_high"]
    assert got["top_stability"] == 1.0  # position 2 is chosen in every resample
    # identical examples: every resample gives the point estimate, so the interval has zero width honestly
    same = _split_half(
        *(np.repeat(x[:1], E, 0) for x in (D, W, R, Do, Wo)), names, 2, "mask", "zero", np.random.default_rng(1), 50
    )
    assert same["gate_low"] == pytest.approx(same["gate_index"]) == pytest.approx(same["gate_high"])
    # fewer than MIN_EXAMPLES: nothing is estimated
    few = _split_half(D[:9], W[:9], R[:9], Do[:9], Wo[:9], names, 2, "mask", "zero", np.random.default_rng(0), 50)
    assert all(np.isnan(v) for v in few.values())


def _gate(n_lo, n_hi, s_lo, s_hi, **extra):
    return {
        "top_position": "eoi",
        "mode": "mask",
        "n_exact": 40,
        "floor": 0.01,
        "whole_damage": 1.0,
        "gate_index": (n_lo + n_hi) / 2,
        "gate_low": n_lo,
        "gate_high": n_hi,
        "sufficiency": (s_lo + s_hi) / 2,
        "sufficiency_low": s_lo,
        "sufficiency_high": s_hi,
        "positions_for_90": 2.0,
        **extra,
    }


@pytest.mark.parametrize(
    ("bounds", "start"),
    [
        ((0.6, 0.9, 0.5, 1.0), "a narrow gate at eoi"),
        ((0.1, 0.49, 0.7, 0.9), "a redundant gate"),
        ((0.5, 0.8, 0.0, 0.49), "a necessary but insufficient position"),
        ((0.0, 0.19, -0.2, 0.3), "distributed communication"),
        ((0.0, 0.2, -0.2, 0.3), "partly concentrated"),
        ((0.1, 0.45, 0.2, 0.49), "partly concentrated"),
        ((0.3, 0.6, 0.6, 0.9), "inconclusive"),
        ((0.6, 0.9, 0.4, 0.7), "inconclusive"),
    ],
)
def test_verdict_follows_the_documented_rule(bounds, start):
    from narrowgate.analyses.gate_scan import verdict

    assert verdict(_gate(*bounds)).startswith(start)


def test_verdict_refuses_below_the_floor_and_on_too_few_examples():
    from narrowgate.analyses.gate_scan import verdict

    assert verdict(_gate(0.6, 0.9, 0.6, 1.0, whole_damage=0.009)).startswith("no verdict: knocking out the whole")
    assert verdict(_gate(0.6, 0.9, 0.6, 1.0, whole_damage=float("nan"))).startswith("no verdict")
    assert verdict(_gate(0.6, 0.9, 0.6, 1.0, n_exact=9)).startswith("no verdict: 9 example(s)")


def test_too_few_examples_are_refused_before_loading_and_fewer_recorded_give_no_interval(
    checkpoint_dir, loaded, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from narrowgate.analyses.gate_scan import GateScan
    from narrowgate.cli import app

    ckpt = str(checkpoint_dir("chameleon"))
    for args in (["--task", "vqa", "--n", "1"], ["--n-per-class", "1"], ["--method", "attribution", "--check", "8"]):
        out = tmp_path / f"refused-{args[1]}"
        result = CliRunner().invoke(
            app, ["run", "gate-scan", "--model", ckpt, "--data", "synthetic", "--out", str(out), *args]
        )
        assert result.exit_code == 1 and "at least 10" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(ng.NarrowgateError, match="--floor"):
        run(EXPERIMENTS["gate-scan"](), _scan_cfg(ckpt, tmp_path / "f", floor=float("nan")), command=["t"])
    # Fewer recorded than the interval needs (failures can shrink a run): the tables stay, no interval, no verdict.
    monkeypatch.setattr(GateScan, "check", lambda self, examples, cfg: None)
    store = run(
        EXPERIMENTS["gate-scan"](),
        {**_scan_cfg(ckpt, tmp_path / "one"), "n_per_class": 1},
        vlm=loaded("chameleon"),
        command=["t"],
    )
    gate, positions = store.tables()["gate"].iloc[0], store.tables()["positions"]
    assert gate["n_exact"] == 6 and gate["verdict"].startswith("no verdict: 6 example(s)")
    assert np.isnan(gate["gate_index"]) and np.isnan(gate["gate_low"]) and np.isnan(gate["sufficiency_high"])
    assert positions["damage"].notna().all() and positions["damage_low"].isna().all()


@pytest.mark.slow
def test_verdict_on_the_three_shipped_organisms(tmp_path):
    """docs/gate-scan.md's rule on the organisms, 8 images per class (48 examples): a gate where one was planted,
    none where none was (at 12-24 examples the non-native one is 'inconclusive' / 'partly concentrated')."""
    from narrowgate import organisms

    want = {"gated": "a narrow gate at eoi", "native": "distributed communication", "non-native": "distributed"}
    for kind, start in want.items():
        path = organisms.path(kind)
        cfg = dict(model=str(path), data="synthetic", out=str(tmp_path / kind), n_per_class=8, batch_size=8)
        store = run(EXPERIMENTS["gate-scan"](), {**cfg, "progress": False}, vlm=ng.load(path), command=["t"])
        gate = store.tables()["gate"].iloc[0]
        assert gate["verdict"].startswith(start), (kind, gate["verdict"])
        assert gate["whole_damage"] > gate["floor"] and np.isfinite(gate["gate_index_zero"])
        if kind == "gated":  # the planted gate: [EOI] needed and enough, in both modes
            assert gate["sufficiency_low"] > 0.9 and gate["gate_low_zero"] > 0.5 and gate["top_stability"] == 1
