"""Knockouts through the Gated DeltaNet layers of hybrid decoders (Qwen 3.5, Qwen 3.5 MoE), on tiny checkpoints.

Held to the hand-written float64 recurrence of `recurrent_reference` (every row on its own explicit view), to the
stock layer run on the sequence with the sources deleted, to the stock model with no knockout, and to the
exact blindness mask mode promises: two images give the same text.
"""

from __future__ import annotations

import pytest
import torch

import narrowgate as ng
from narrowgate.engine import recurrent
from narrowgate.engine.protocol import InterventionError
from narrowgate.engine.shared import Condition
from tests.engine import hybrid, reference
from tests.engine.conftest import same_prompt
from tests.fixtures.common import PROMPTS, images

ATOL = 1e-5


@pytest.fixture(scope="module", params=hybrid.TYPES)
def model_type(request):
    return request.param


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    paths = {}

    def get(model_type):
        if model_type not in paths:
            paths[model_type] = hybrid.build(tmp_path_factory.mktemp(f"ckpt-{model_type}"), model_type)
        return paths[model_type]

    return get


@pytest.fixture(scope="module")
def vlm(built, model_type):
    return ng.load(built(model_type), dtype="float32", attn_implementation="sdpa")


@pytest.fixture(scope="module")
def ref(built, model_type, vlm):
    return reference.reference_model(built(model_type), vlm.family.decoder_layers)


def _reference_logits(ref, vlm, batch, edits: dict) -> torch.Tensor:
    reference.EDITS.update(mask=[], zero=[])
    for mode, items in edits.items():
        reference.EDITS[mode] = list(items)
    try:
        with torch.no_grad():
            return ref(**vlm.model_inputs(batch), use_cache=False).logits
    finally:
        reference.EDITS.update(mask=[], zero=[])


def test_the_hybrid_layers_are_found(vlm):
    assert sorted(vlm.mixers) == [0, 1, 3] and vlm.attention_layers == [2]
    assert all(kind is recurrent.KINDS[0] for kind, _ in vlm.mixers.values())


def test_no_knockout_is_the_stock_model(vlm):
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    with torch.no_grad():
        stock = vlm.model(**vlm.model_inputs(batch), use_cache=False).logits
    assert torch.equal(vlm.forward(batch).logits, stock)


def test_a_knockout_no_target_can_read_is_the_stock_model(vlm):
    """``last -> eoi``: eoi comes before last, so its view is the whole sequence; the view pass must reproduce the
    stock layer (convolution, kernel, norm) and the stock output must stand everywhere else."""
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    stock = vlm.forward(batch).logits
    for mode in ("mask", "zero"):
        got = vlm.forward(batch, knockouts=[ng.Knockout("last", "eoi", mode=mode)]).logits
        torch.testing.assert_close(got, stock, atol=ATOL, rtol=0)


CASES = [
    ("eoi", "text", None),
    ("image", ("eoi", "text"), None),
    ("eoi", ("eoi", "text"), None),  # a target that blocks itself: its own query, not its own write
    ("image", "image", None),  # targets inside the source span
    ("image", "text", (0, 3)),  # some layers only
    ("image[3]", "text", (1,)),
]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mask", "zero"])
@pytest.mark.parametrize("source, target, layers", CASES)
def test_knockouts_equal_the_hand_written_recurrence(vlm, ref, mode, source, target, layers):
    """Left-padded examples of different lengths, every layer kind: the engine equals the float64 reference, and
    the knockout changes the reference's logits (the test can fail)."""
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    keep = batch.inputs["attention_mask"].bool()
    ko = ng.Knockout(source, target, layers=layers, mode=mode)
    ours = vlm.forward(batch, knockouts=[ko]).logits
    spec = [(None if layers is None else set(layers), batch.mask(target), batch.mask(source))]
    theirs = _reference_logits(ref, vlm, batch, {mode: spec})
    plain = _reference_logits(ref, vlm, batch, {})
    assert (plain - theirs)[keep].abs().max() > 1e-4
    torch.testing.assert_close(ours[keep], theirs[keep], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_several_knockouts_of_both_modes_at_once_equal_the_reference(vlm, ref):
    """Rows of three different blocked sets at one layer (text: the image deleted; last: the image deleted and eoi
    silenced; eoi: silenced by itself), and a layer window per knockout."""
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    keep = batch.inputs["attention_mask"].bool()
    kos = [
        ng.Knockout("image", "text", mode="mask"),
        ng.Knockout("eoi", ("eoi", "last"), layers=(0, 1, 2), mode="zero"),
    ]
    ours = vlm.forward(batch, knockouts=kos).logits
    theirs = _reference_logits(
        ref,
        vlm,
        batch,
        {
            "mask": [(None, batch.mask("text"), batch.mask("image"))],
            "zero": [({0, 1, 2}, batch.mask(("eoi", "last")), batch.mask("eoi"))],
        },
    )
    torch.testing.assert_close(ours[keep], theirs[keep], atol=ATOL, rtol=0)


def test_mask_mode_makes_the_text_blind_to_the_image(vlm):
    """Two different images, one prompt: after ``image -> (eoi, text)`` in mask mode the text logits are the same;
    zero mode still lets the image's decay through (the state decays through the silenced positions)."""
    batch = same_prompt(vlm)
    eoi = int(batch.index("eoi")[0])
    plain = vlm.forward(batch).logits[:, eoi:]
    assert (plain[0] - plain[1]).abs().max() > 1e-3
    blind = vlm.forward(batch, knockouts=[ng.Knockout("image", ("eoi", "text"), mode="mask")]).logits[:, eoi:]
    torch.testing.assert_close(blind[0], blind[1], atol=1e-6, rtol=0)
    zero = vlm.forward(batch, knockouts=[ng.Knockout("image", ("eoi", "text"), mode="zero")]).logits[:, eoi:]
    assert (zero[0] - zero[1]).abs().max() > 1e-4


def test_mask_mode_is_the_stock_layer_on_the_sequence_without_the_sources(vlm):
    """One Gated DeltaNet module: a row's mask-mode view equals the stock module run on the positions that remain."""
    kind, module = vlm.mixers[0]
    torch.manual_seed(0)
    T = 40
    hidden = torch.randn(2, T, vlm.hidden_size)
    absent = torch.zeros(2, T, dtype=torch.bool)
    absent[0, 5:17] = True
    absent[1, [3, 4, 20, 30, 31, 32]] = True
    with torch.no_grad():
        proj = kind.project(module, hidden)
        mixed, _ = kind.mix(module, {k: proj[k] for k in kind.carried}, absent, torch.zeros_like(absent), False)
        views = kind.finish(module, mixed, proj)
        for b in range(2):
            left = (~absent[b]).nonzero().flatten()
            stock = module(hidden_states=hidden[b : b + 1, left])
            torch.testing.assert_close(views[b, left], stock[0], atol=1e-6, rtol=0)


def test_view_convolution_without_blocked_positions_is_the_stock_convolution(vlm):
    _, module = vlm.mixers[1]
    x = torch.randn(3, module.conv1d.weight.shape[0], 11)
    none = torch.zeros(3, 11, dtype=torch.bool)
    got = recurrent.view_conv(x, module.conv1d.weight[:, 0], module.conv1d.bias, none, none)
    want = module.conv1d(x)[..., :11]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_generation_decodes_on_from_the_knocked_out_state(vlm):
    """The prompt pass leaves each example's view state in the cache: every decoding step's logits equal a whole
    forward of the longer sequence under the same knockout (generated tokens count as text)."""
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    n = 3
    for mode in ("mask", "zero"):
        ko = ng.Knockout("image", ("eoi", "text"), mode=mode)
        with vlm._running(vlm._plan(batch, knockouts=[ko])), torch.no_grad():
            out = vlm.model.generate(
                **vlm.model_inputs(batch),
                max_new_tokens=n,
                output_logits=True,
                return_dict_in_generate=True,
                **vlm._gen_kwargs({}),
            )
        new = out.sequences[:, batch.length :]
        whole = vlm.forward(vlm.extend(batch, new.tolist()), knockouts=[ko]).logits
        for s in range(n):
            torch.testing.assert_close(out.logits[s], whole[:, batch.length - 1 + s], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_generate_equals_greedy_decoding_of_the_reference(vlm, ref):
    """`VLM.generate` against the reference re-run on the whole longer sequence at every step (zero mode's
    decoding is held to whole forwards by the test above)."""
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    n = 3
    ko = ng.Knockout("image", ("eoi", "text"), mode="mask")
    got = vlm.generate(batch, knockouts=[ko], max_new_tokens=n)[:, batch.length :]
    tokens: list[list[int]] = [[], []]
    for _ in range(n):
        cur = vlm.extend(batch, tokens) if tokens[0] else batch
        spec = [(None, cur.mask(("eoi", "text")), cur.mask("image"))]
        nxt = _reference_logits(ref, vlm, cur, {"mask": spec})[:, -1].argmax(-1)
        tokens = [t + [int(x)] for t, x in zip(tokens, nxt)]
    assert got.tolist() == tokens


def test_conditions_share_the_prefix_and_equal_separate_forwards(vlm):
    """Over a shared prefix every suffix row computes its recurrent layers' view of the prefix from the prefix's
    projections: conditions of both modes, a patch, and the baseline equal separate whole forwards."""
    batch = same_prompt(vlm)
    other = vlm.forward(batch, capture=ng.Capture("eoi")).residuals["eoi"].flip(0)
    conds = [
        Condition("baseline"),
        Condition("image->text", knockouts=(ng.Knockout("image", "text", mode="mask"),)),
        Condition("eoi->text", knockouts=(ng.Knockout("eoi", "text"),)),
        Condition("image[2]->text@0,3", knockouts=(ng.Knockout("image[2]", "text", layers=(0, 3), mode="zero"),)),
        Condition("patch", patches=(ng.Patch("eoi", 1, other[:, 1]),)),
    ]
    assert vlm.runner.prefix_length(batch, vlm.runner.plans(batch, conds)) > max(lay.end for lay in batch.layouts)
    shared = vlm.forward_conditions(batch, conds)
    for c in conds:
        want = vlm.forward(batch, knockouts=c.knockouts, patches=c.patches).logits[:, -1]
        torch.testing.assert_close(shared[c.name].last_logits, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["mask", "zero"])
def test_forward_knockouts_over_a_shared_prefix_equal_whole_forwards(vlm, mode):
    """The gate scan's call: arbitrary source sets in the prefix, each a batch row of one suffix pass."""
    batch = vlm.prepare(images(1, seed=2), [PROMPTS[1]])
    lay = batch.layouts[0]
    prefix = vlm.share_prefix(batch, lay.eoi + 1)
    sets = [[], [lay.start], [lay.start + 5, lay.end], [lay.eoi], list(range(lay.start, lay.eoi + 1)), [lay.boi]]
    sources = torch.zeros(len(sets), 1, batch.length, dtype=torch.bool)
    for c, positions in enumerate(sets):
        sources[c, 0, positions] = True
    got = vlm.forward_knockouts(prefix, sources, mode=mode)
    for c, positions in enumerate(sets):
        kos = [_PositionKnockout(sources[c], mode)] if positions else []
        want = vlm.forward(batch, interventions=kos).logits[:, -1]
        torch.testing.assert_close(got[c], want, atol=ATOL, rtol=0)


class _PositionKnockout(ng.Intervention):
    """``positions -> text`` at every layer, the positions given as a [1, T] mask (roles cannot name a set)."""

    def __init__(self, sources: torch.Tensor, mode: str):
        self.sources, self.mode = sources, mode

    def resolve(self, batch, model):
        from narrowgate.engine.interventions import ResolvedKnockout
        from narrowgate.engine.protocol import RoleMask, role_mask

        return ResolvedKnockout(RoleMask(self.sources, False), role_mask(batch, "text"), None, self.mode)


def test_generation_with_conditions_runs_each_condition_whole(vlm):
    """A recurrent layer's cached state cannot be cropped back to a prefix: generation shares none, and each
    condition's tokens equal its own `generate`."""
    batch = same_prompt(vlm)
    conds = [Condition("baseline"), Condition("image->text", knockouts=(ng.Knockout("image", "text", mode="mask"),))]
    plans = vlm.runner.plans(batch, conds)
    assert vlm.runner.prefix_length(batch, plans, generation=True) == 0
    got = vlm.generate_conditions(batch, conds, max_new_tokens=3)
    for c in conds:
        assert torch.equal(got[c.name], vlm.generate(batch, knockouts=c.knockouts, max_new_tokens=3))


def test_attn_out_at_a_recurrent_layer_is_the_mixer_output_after_the_knockout(vlm):
    """``attn_out`` at a Gated DeltaNet layer reads the mixer's output, knocked out first."""
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    ko = ng.Knockout("image", "text", mode="mask")
    module = vlm.mixers[1][1]
    outputs = []
    handle = module.register_forward_hook(lambda m, a, o: outputs.append(o.detach().clone()))
    seen = []
    try:
        vlm.forward(batch)
        vlm.forward(batch, knockouts=[ko], interventions=[ng.Hook("attn_out", 1, "text", lambda v: seen.append(v))])
    finally:
        handle.remove()
    stock, knocked = outputs
    text = batch.mask("text")
    for b in range(2):
        want = knocked[b][text[b]]
        torch.testing.assert_close(seen[0][b, : len(want)], want, atol=0, rtol=0)
        assert (stock[b][text[b]] - want).abs().max() > 1e-4


def test_resid_hooks_see_the_decoded_positions(vlm):
    """Generation on a hybrid: a hook at a recurrent layer's residual sees positions T, T+1, ... for the new tokens
    (the recurrent layers' cache holds no positions to count)."""
    batch = same_prompt(vlm)
    seen = []
    hook = ng.Hook("resid", 1, "text", lambda v, where: seen.append(where.positions.clone()))
    vlm.generate(batch, interventions=[hook], max_new_tokens=3)
    T = batch.length
    assert [int(p[0, 0]) for p in seen[-2:]] == [T, T + 1]


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda v, b: v.forward(b, attention_stats=True), "Gated DeltaNet"),
        (lambda v, b: v.forward(b, interventions=[ng.Hook("pattern", 0, "text", lambda p: None)]), "[0]"),
        (lambda v, b: v.forward(b, interventions=[ng.Hook("head", 1, "text", lambda h: None)]), "attention layers"),
        (lambda v, b: v.attribute(v.share_prefix(b, b.length - 2)), "first-order"),
        (lambda v, b: v.generate(b, knockouts=[ng.Knockout("text", "last")], max_new_tokens=2), "generated tokens"),
    ],
)
def test_what_a_recurrent_layer_lacks_is_refused_by_name(vlm, call, words):
    batch = same_prompt(vlm)
    with pytest.raises(InterventionError, match="Gated DeltaNet") as err:
        call(vlm, batch)
    assert words in str(err.value)


def test_head_and_pattern_hooks_at_the_attention_layer_still_apply(vlm):
    batch = same_prompt(vlm)
    seen = []
    vlm.forward(batch, interventions=[ng.Hook("pattern", 2, "last", lambda p: seen.append(p.shape))])
    assert seen and seen[0][-1] == batch.length


@pytest.mark.slow
def test_gradients_through_the_knockout_equal_the_reference(vlm, ref, built, model_type):
    """Under `VLM.intervening` the view pass carries gradients: d(loss)/d(A_log) of every Gated DeltaNet layer
    equals the float64 reference's."""
    batch = same_prompt(vlm)
    ko = ng.Knockout("image", ("eoi", "text"), mode="zero")
    vlm.model.zero_grad()
    with vlm.intervening(batch, knockouts=[ko]):
        logits = vlm.model(**vlm.model_inputs(batch), use_cache=False).logits
    logits[:, -1].logsumexp(-1).sum().backward()
    ours = [m.A_log.grad.clone() for _, m in vlm.mixers.values()]
    vlm.model.zero_grad()
    reference.EDITS.update(mask=[], zero=[(None, batch.mask(("eoi", "text")), batch.mask("image"))])
    try:
        theirs_logits = ref(**vlm.model_inputs(batch), use_cache=False).logits
    finally:
        reference.EDITS.update(mask=[], zero=[])
    ref.zero_grad()
    theirs_logits[:, -1].logsumexp(-1).sum().backward()
    layers = vlm.family.decoder_layers(ref)
    theirs = [layers[l].linear_attn.A_log.grad for l in sorted(vlm.mixers)]
    for a, b in zip(ours, theirs):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_close_leaves_the_mixers_as_found(built, model_type):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = built(model_type)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    mixers = [layer.linear_attn for layer in model.model.language_model.layers if hasattr(layer, "linear_attn")]
    before = [dict(m._forward_hooks) for m in mixers]
    vlm = ng.VLM(model, AutoProcessor.from_pretrained(path))
    assert all(len(m._forward_hooks) == len(b) + 2 for m, b in zip(mixers, before))  # knockouts, then attn_out
    vlm.close()
    assert [dict(m._forward_hooks) for m in mixers] == before


def test_a_linear_attention_layer_reads_where_the_call_starts_from_an_attention_layer():
    """A linear-attention cache layer holds a state, not positions: whether it raises (transformers 5.23 - 5.24) or
    counts what its own state took in (5.25: nothing, in a suffix pass over a shared prefix), the window's start is
    the attention layers' length; a later recurrent layer keeps what an earlier layer of the call read."""
    from types import SimpleNamespace

    from transformers.cache_utils import DynamicLayer, LinearAttentionLayer

    from narrowgate import compat

    class Counting(LinearAttentionLayer):
        def get_seq_length(self) -> int:
            return 0  # a state that took in nothing, as 5.25 counts it

    attention = DynamicLayer()
    attention.lazy_initialization(torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4))
    attention.keys, attention.values = torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4)
    cache = SimpleNamespace(layers=[Counting(), LinearAttentionLayer(), attention, Counting()])
    assert [compat.past_length(cache, layer) for layer in range(4)] == [7, None, 7, None]
    assert compat.cached_positions(cache) == 7
    assert compat.past_length(SimpleNamespace(layers=[Counting()]), 0) == 0  # no attention layer: nothing cached
