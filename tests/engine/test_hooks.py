"""`ng.Hook` at every site, against plain PyTorch hooks on a separately loaded stock model (float64).

The matrix: every site x every family x SDPA/eager x plain forward / shared prefix / generation. The function
both edits (mixing rows and examples, so the rows it is handed must be exactly the reference's) and records
what it was handed, which must equal what the reference's hook was handed, call for call.
"""

from __future__ import annotations

import pytest
import torch

import narrowgate as ng
from narrowgate.engine.shared import prefix_length
from tests.engine import hook_reference as ref
from tests.engine.conftest import same_prompt
from tests.fixtures.common import PROMPTS, images

ATOL = 1e-9
ROLES = ("eoi", "text")
SITES = tuple(ng.SITES)


def _edit(calls: list, read_only: bool = False):
    """A function that records its value and, unless ``read_only``, mixes rows and examples into it."""

    def edit(value, where):
        calls.append((value.detach().clone(), where.positions.clone()))
        if read_only:
            return None
        axis = 2 if where.site == "pattern" else 1
        mean = value.sum(axis, keepdim=True) / where.valid.sum().clamp(min=1)
        if where.site == "pattern":  # keep each row's support: no weight moves onto a key the row may not see
            return value * (1 + value.flip(0) + mean)
        return 0.5 * value + 0.5 * value.flip(0) + 0.1 * mean

    return edit


@pytest.fixture(scope="module")
def stock(checkpoint_dir):
    """``stock(family, attn, pattern)`` -> a float64 stock model (cached)."""
    cache = {}

    def get(family, attn, pattern):
        key = (family, attn, pattern)
        if key not in cache:
            cache[key] = ref.stock_model(checkpoint_dir(family), attn, pattern=pattern)
        return cache[key]

    return get


def _reference(stock, vlm, family, attn, site, at, batch, fn):
    # Stock eager attention in float64 softmaxes in float32, where the float64 mask fill becomes -inf: left-padded
    # rows turn to NaN. Its by-hand float64 twin serves instead (and the pattern site needs it anyway).
    model = stock(family, attn, site == "pattern" or attn == "eager")
    mask = batch.mask(ROLES)
    return model, ref.hooked(model, vlm.family.decoder_layers(model), [ref.Edit(site, at, mask, True, fn)])


def _same_calls(ours: list, theirs: list) -> None:
    assert len(ours) == len(theirs) > 0
    for (a, pa), (b, pb) in zip(ours, theirs):
        assert torch.equal(pa, pb)
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("site", SITES)
def test_hook_in_a_forward_equals_plain_pytorch_hooks(loaded, stock, family, attn, site):
    """Left-padded examples of different lengths: the rows an example lacks come zero-padded, as the reference pads."""
    vlm = loaded(family, dtype="float64", attn=attn)
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    at = 1
    ours, theirs = [], []
    got = vlm.forward(batch, interventions=[ng.Hook(site, at, ROLES, _edit(ours))]).logits
    model, hooks = _reference(stock, vlm, family, attn, site, at, batch, _edit(theirs))
    with hooks, torch.no_grad():
        want = model(**vlm.model_inputs(batch), use_cache=False).logits
    plain = vlm.forward(batch).logits
    keep = batch.inputs["attention_mask"].bool()
    assert (got[keep] - plain[keep]).abs().max() > 1e-6, "the hook must change the logits"
    torch.testing.assert_close(got[keep], want[keep], atol=ATOL, rtol=0)
    _same_calls(ours, theirs)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("site", SITES)
def test_hook_over_a_shared_prefix_equals_plain_pytorch_hooks(loaded, stock, family, attn, site):
    """The hook's condition runs as batch rows beside a baseline over a prefix computed once."""
    vlm = loaded(family, dtype="float64", attn=attn)
    batch = same_prompt(vlm)
    at = 1
    ours, theirs = [], []
    conds = [ng.Condition("baseline"), ng.Condition("hook", interventions=(ng.Hook(site, at, ROLES, _edit(ours)),))]
    assert prefix_length(batch, conds) > max(lay.end for lay in batch.layouts), "the prefix must be shared"
    got = vlm.forward_conditions(batch, conds)
    model, hooks = _reference(stock, vlm, family, attn, site, at, batch, _edit(theirs))
    with hooks, torch.no_grad():
        want = model(**vlm.model_inputs(batch), use_cache=False).logits[:, -1]
    base = vlm.forward(batch).logits[:, -1]
    # Per-condition logits come as float32 (where a family's -finfo.max fill of a masked vocabulary entry is -inf).
    torch.testing.assert_close(got["baseline"].last_logits, base.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got["hook"].last_logits, want.float(), atol=1e-5, rtol=0)
    assert (want - base).abs().max() > 1e-4
    _same_calls(ours, theirs)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("site", SITES)
def test_hook_in_generation_equals_plain_pytorch_hooks(loaded, stock, family, attn, site):
    """Generated tokens count as text: the hook sees the prompt's rows, then each new token."""
    vlm = loaded(family, dtype="float64", attn=attn)
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    at, new = 1, 4
    ours, theirs = [], []
    got = vlm.generate(batch, interventions=[ng.Hook(site, at, ROLES, _edit(ours))], max_new_tokens=new)
    model, hooks = _reference(stock, vlm, family, attn, site, at, batch, _edit(theirs))
    with hooks, torch.no_grad():
        want = model.generate(**vlm.model_inputs(batch), max_new_tokens=new, **vlm._gen_kwargs({}))
    assert torch.equal(got, want.cpu())
    assert len(ours) == new  # the prompt's rows, then one call per generated token but the last
    _same_calls(ours, theirs)
    assert all(int(p.max()) >= batch.length for _, p in ours[1:])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("site", SITES)
def test_hook_under_autograd_matches_plain_pytorch_hooks(checkpoint_dir, stock, family, attn, site):
    """Inside `intervening`, in training mode: loss and every parameter gradient equal the reference's."""
    vlm = ng.load(checkpoint_dir(family), dtype="float64", attn_implementation=attn)
    vlm.model.train()
    tb = vlm.prepare_training(images(2, seed=1), PROMPTS, [" a red circle", " blue"])
    ours, theirs = [], []
    vlm.model.zero_grad(set_to_none=True)
    with vlm.intervening(tb.batch, interventions=[ng.Hook(site, 1, ROLES, _edit(ours))]):
        loss = vlm.answer_loss(tb)
    loss.backward()
    got = {n: p.grad.clone() for n, p in vlm.model.named_parameters() if p.grad is not None}
    model, hooks = _reference(stock, vlm, family, attn, site, 1, tb.batch, _edit(theirs))
    model.train()
    model.zero_grad(set_to_none=True)
    with hooks:
        logits = model(**vlm.model_inputs(tb.batch), use_cache=False).logits
    want_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), tb.labels[:, 1:].flatten(), ignore_index=-100
    )
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert abs(float(loss.detach()) - float(want_loss.detach())) <= 1e-9 * abs(float(want_loss.detach()))
    assert set(got) == set(want) and got
    floor = 1e-4 * max(float(g.norm()) for g in want.values())
    for n in want:
        assert float((got[n] - want[n]).norm()) <= 1e-6 * max(float(want[n].norm()), floor), n
    _same_calls(ours, theirs)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("site", SITES)
def test_a_hook_that_only_reads_changes_nothing(loaded, family, attn, site):
    vlm = loaded(family, attn=attn)
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    calls = []
    got = vlm.forward(batch, interventions=[ng.Hook(site, 1, "text", _edit(calls, read_only=True))]).logits
    keep = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(got[keep], vlm.forward(batch).logits[keep], atol=1e-6, rtol=0)
    assert len(calls) == 1 and bool(calls[0][1][:, 0].ge(0).all())


def test_hook_at_the_last_residual_index(loaded, stock):
    """Residual index n_layers is the last layer's output, before the final norm."""
    vlm = loaded("chameleon", dtype="float64")
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    ours, theirs = [], []
    L = vlm.n_layers
    got = vlm.forward(batch, interventions=[ng.Hook("resid", L, ROLES, _edit(ours))]).logits
    model, hooks = _reference(stock, vlm, "chameleon", "sdpa", "resid", L, batch, _edit(theirs))
    with hooks, torch.no_grad():
        want = model(**vlm.model_inputs(batch), use_cache=False).logits
    keep = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], atol=ATOL, rtol=0)
    _same_calls(ours, theirs)


def test_a_pattern_hook_computes_only_its_own_rows_by_hand(loaded, monkeypatch):
    """Under SDPA the map is never formed: the by-hand probabilities cover the hooked rows and nothing else."""
    from narrowgate.engine import attention

    vlm = loaded("chameleon")
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    assert batch.length > attention.DIRECT_ROWS
    rows = []
    real = attention._row_probs

    def spy(query, key, scaling, allow, idx, zero, *args, **kwargs):
        rows.append(tuple(idx.shape))
        return real(query, key, scaling, allow, idx, zero, *args, **kwargs)

    monkeypatch.setattr(attention, "_row_probs", spy)
    vlm.forward(batch, interventions=[ng.Hook("pattern", 1, "last", lambda p: p * 0.5)])
    assert rows == [(batch.size, 1)]


def test_hook_errors_name_the_problem(loaded):
    vlm = loaded("llava")
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    with pytest.raises(ng.InterventionError, match="eol"):  # llava has no in-image line breaks
        vlm.forward(batch, interventions=[ng.Hook("resid", 1, "eol", lambda v: v)])
    with pytest.raises(ng.InterventionError, match="out of range"):
        vlm.forward(batch, interventions=[ng.Hook("attn_out", vlm.n_layers, "eoi", lambda v: v)])
    with pytest.raises(ng.InterventionError, match=r"returned \(2, 1\) at site 'resid'"):
        vlm.forward(batch, interventions=[ng.Hook("resid", 1, "eoi", lambda v: v[:, :, 0])])
    with pytest.raises(ValueError, match="site"):
        ng.Hook("hook_z", 1, "eoi", lambda v: v)
    with pytest.raises(ng.RoleError):
        ng.Hook("resid", 1, "nope", lambda v: v)


def test_conditions_with_different_hooks_at_one_site_stack_exactly(loaded, family):
    """Hooks of several conditions at the same site share one pass; each sees its own condition's rows only."""
    vlm = loaded(family)
    batch = same_prompt(vlm)
    a = ng.Hook("resid", 1, "text", lambda v: v * 1.5)
    b = ng.Hook("resid", 1, "text", lambda v: v - v.mean(0, keepdim=True))  # mixes the batch's examples
    k = ng.Knockout("image", "text", mode="mask")
    conds = [
        ng.Condition("baseline"),
        ng.Condition("a", interventions=(a,)),
        ng.Condition("b", interventions=(b,)),
        ng.Condition("a+b", interventions=(a, b)),
        ng.Condition("b+a", knockouts=(k,), interventions=(b, a)),
    ]
    got = vlm.forward_conditions(batch, conds, interventions=[ng.Hook("mlp_out", 0, "last", lambda v: v * 0.9)])
    for c in conds:
        full = vlm.forward(
            batch,
            knockouts=c.knockouts,
            interventions=[*c.interventions, ng.Hook("mlp_out", 0, "last", lambda v: v * 0.9)],
        )
        torch.testing.assert_close(got[c.name].last_logits, full.logits[:, -1].float(), atol=1e-5, rtol=0)
    assert (got["a+b"].last_logits - got["b+a"].last_logits).abs().max() > 1e-4
    with pytest.raises(ng.InterventionError, match="reads for every condition"):
        vlm.forward_conditions(batch, [ng.Condition("c", interventions=(ng.Capture("eoi"),))])


@pytest.mark.parametrize("site", SITES)
def test_gradient_checkpointing_reapplies_hooks(checkpoint_dir, site):
    """The backward pass's recompute runs the hook again: gradients equal those without checkpointing."""
    vlm = ng.load(checkpoint_dir("chameleon"), dtype="float64")
    vlm.model.train()
    tb = vlm.prepare_training(images(2, seed=1), PROMPTS, [" a red circle", " blue"])

    def grads():
        vlm.model.zero_grad(set_to_none=True)
        with vlm.intervening(tb.batch, interventions=[ng.Hook(site, 1, ROLES, _edit([]))]):
            loss = vlm.answer_loss(tb)
        loss.backward()
        return {n: p.grad.clone() for n, p in vlm.model.named_parameters() if p.grad is not None}

    plain = grads()
    vlm.enable_gradient_checkpointing()
    again = grads()
    assert set(plain) == set(again)
    for n in plain:
        torch.testing.assert_close(again[n], plain[n], rtol=1e-10, atol=1e-12)
