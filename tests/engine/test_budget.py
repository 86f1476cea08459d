"""Memory by design: conditions per suffix pass and query rows per attention block come from the memory budget,
the engine obeys them, and results do not depend on the split."""

from __future__ import annotations

import weakref
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import narrowgate as ng
from narrowgate.engine import attention
from narrowgate.engine.budget import BLOCK_SHARE, Budget, Shape, fused_prefix, plain_forward_bytes
from narrowgate.errors import OptionError
from narrowgate.parsing import parse_size
from tests.engine.conftest import same_prompt
from tests.fixtures.common import images

#: A planted model shape: 2 layers, hidden 8, MLP 16, 4 heads over 2 key/value heads of size 2, 10 tokens, float32.
SHAPE = Shape(layers=2, hidden=8, intermediate=16, heads=4, kv_heads=2, head_dim=2, vocab=10, element=4)


def test_sizes_parse_to_bytes_or_are_refused_naming_the_option():
    assert parse_size("8GiB") == 8 << 30 and parse_size("512 MB") == 512 * 10**6 and parse_size("1.5g") == 3 << 29
    assert parse_size(str(5 << 20)) == 5 << 20 and parse_size(None) is None and parse_size("auto") is None
    for bad in ("lots", "8 GiBs", "-1GiB", "512KiB", "inf", "nan"):
        with pytest.raises(OptionError, match="--memory-budget"):
            parse_size(bad)


def test_the_shape_is_read_from_the_text_config(loaded):
    vlm = loaded("qwen2_vl")  # a composite config: the decoder's sizes are in its text config
    shape = Shape.of(vlm.model)
    assert (shape.layers, shape.hidden, shape.intermediate, shape.heads, shape.kv_heads) == (3, 64, 128, 4, 2)
    assert (shape.head_dim, shape.vocab, shape.element) == (16, vlm.model.config.get_text_config().vocab_size, 4)
    text = SimpleNamespace(hidden_size=8, num_attention_heads=2, num_hidden_layers=2, intermediate_size=[16, 32])
    model = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: text), dtype=torch.bfloat16)
    planted = Shape.of(model)  # per-layer MLP sizes count at their largest; absent sizes take their defaults
    assert (planted.intermediate, planted.kv_heads, planted.head_dim, planted.element) == (32, 2, 4, 2)


def test_the_plain_forward_estimate_by_hand():
    # per token and layer: (3 x 16 MLP + 4 x 8 hidden + 2 x 4 key/value) x 4 bytes; cache: 2 layers x (k, v) x 4 x 4
    assert SHAPE.per_token == 352 and SHAPE.cache(1, 1) == 64
    assert plain_forward_bytes(SHAPE, rows=2, length=10) == 2 * 10 * 64 + 2 * 10 * 352 + 2 * 10 * 4
    assert Budget(SHAPE).total(2, 10) == plain_forward_bytes(SHAPE, 2, 10)
    assert Budget(SHAPE, limit=12345).total(2, 10) == 12345


def test_a_condition_costs_by_hand():
    """2 examples x 6 suffix tokens meeting 30 keys, one knockout, the last position's logits."""
    b = Budget(SHAPE)
    tokens, logits = 2 * 6, 2 * 1 * 10 * 8
    kw = dict(knockouts=1, keep=1, grad=False)
    # fused: 5 mask bytes + the folded bias, 6 bytes x 2 query heads per key/value head
    assert b.per_condition(2, 6, 30, fused=True, probs=False, **kw) == tokens * (352 + 30 * (5 + 12)) + logits
    # by hand: 5 mask bytes + 4 heads' float32 scores (16) + where to fill (2 + 2)
    assert b.per_condition(2, 6, 30, fused=False, probs=False, **kw) == tokens * (352 + 30 * (5 + 16 + 4)) + logits
    # with probabilities: 20 bytes per head more
    assert b.per_condition(2, 6, 30, fused=False, probs=True, **kw) == tokens * (352 + 30 * (25 + 80)) + logits


@pytest.mark.parametrize("limit", [20_000, 60_000, 200_000, 10**7])
@pytest.mark.parametrize("fused,probs", [(True, False), (False, False), (False, True)])
def test_conditions_per_pass_fill_the_budget_beside_the_prefix_cache(limit, fused, probs):
    b = Budget(SHAPE, limit)
    n = b.conditions_per_pass(2, 30, 24, fused=fused, probs=probs)
    each = b.per_condition(2, 6, 30, fused=fused, probs=probs, grad=False, knockouts=1, keep=1)
    free = limit - SHAPE.cache(2, 24)
    assert n >= 1 and (n == 1 or n * each <= free) and (n + 1) * each > free


def test_query_rows_fill_their_share_of_the_budget():
    b = Budget(SHAPE, 40_000)
    assert b.query_rows(2, 100, 10) == 40_000 // BLOCK_SHARE // (2 * 100 * 10) == 5
    assert Budget(SHAPE, 1000).query_rows(2, 100, 10) == 1  # at least one row


def _limited(vlm, monkeypatch, limit: int) -> None:
    monkeypatch.setattr(vlm, "budget", replace(vlm.budget, limit=limit))


def _image():
    return images(1, seed=5)[0]


def _fused(keys) -> bool:
    return fused_prefix(keys.device, keys.dtype, probs=False, zero_in_prefix=False, grad=False, softcap=False)


@pytest.mark.parametrize("fam", ["chameleon", "qwen2_vl"])
@pytest.mark.parametrize("mode", ["mask", "zero"])
def test_suffix_passes_take_what_the_budget_holds(loaded, fam, mode, monkeypatch):
    """A scan under a budget planted to hold 5 conditions runs in passes of 5, and equals the one-pass scan."""
    vlm = loaded(fam)
    batch = vlm.prepare([_image()], ["What color is the shape?"])
    lay = batch.layouts[0]
    prefix = vlm.share_prefix(batch, lay.eoi + 1)
    side = list(range(lay.start, lay.end + 1)) + [lay.eoi]
    sources = torch.zeros(len(side) + 1, 1, batch.length, dtype=torch.bool)
    for i, p in enumerate(side):
        sources[i + 1, 0, p] = True
    whole = vlm.forward_knockouts(prefix, sources, mode=mode)

    keys = prefix.kv[0][0]
    fused = mode == "mask" and _fused(keys)
    each = vlm.budget.per_condition(
        1, batch.length - prefix.length, batch.length, fused=fused, probs=False, grad=False, knockouts=1, keep=1
    )
    _limited(vlm, monkeypatch, vlm.budget.shape.cache(1, prefix.length) + 5 * each + each // 2)
    sizes = []
    original = vlm.runner.suffix_pass

    def counting(prefix, plan, n, keep=1):
        sizes.append(n)
        return original(prefix, plan, n, keep)

    monkeypatch.setattr(vlm.runner, "suffix_pass", counting)
    split = vlm.forward_knockouts(prefix, sources, mode=mode)
    C = len(side) + 1
    assert sizes == [5] * (C // 5) + ([C % 5] if C % 5 else [])
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=0)  # float32 rounding: kernels see other shapes


@pytest.mark.parametrize("fam", ["chameleon", "llava"])
@pytest.mark.parametrize("mode", ["mask", "zero"])
def test_attention_blocks_take_what_the_budget_holds(loaded, fam, mode, monkeypatch):
    """A whole-sequence forward with knockouts and statistics under a budget planted for 4 query rows per block:
    no mask is ever made for more rows, and logits, residuals and statistics equal the one-block forward's."""
    vlm = loaded(fam)
    batch = same_prompt(vlm)
    B, T = batch.size, batch.length
    assert T > attention.DIRECT_ROWS  # the whole-sequence path, not the short-window one
    knockouts = [ng.Knockout("last_image", "text", mode=mode), ng.Knockout("image", "eoi", mode=mode, layers=(0,))]
    capture = ng.Capture(("eoi", "last"))
    whole = vlm.forward(batch, knockouts=knockouts, capture=capture, attention_stats=True)

    _limited(vlm, monkeypatch, BLOCK_SHARE * B * T * (8 + 2) * 4 + 1)  # 4 rows of (8 + 2 knockouts) bytes per key
    rows = []
    effective = attention._effective_mask

    def recording(plan, attention_mask, layer, B_, Q, K, offset, device, block=None):
        allow, zero = effective(plan, attention_mask, layer, B_, Q, K, offset, device, block)
        rows.append(allow.shape[2])
        return allow, zero

    monkeypatch.setattr(attention, "_effective_mask", recording)
    split = vlm.forward(batch, knockouts=knockouts, capture=capture, attention_stats=True)
    assert rows and max(rows) == 4 and sum(rows) == T * vlm.n_layers
    torch.testing.assert_close(split.logits, whole.logits, atol=1e-6, rtol=0)
    for role in ("eoi", "last"):
        torch.testing.assert_close(split.residuals[role], whole.residuals[role], atol=1e-6, rtol=0)
    torch.testing.assert_close(
        split.cross_modal_attention.fractions, whole.cross_modal_attention.fractions, atol=1e-6, rtol=0, equal_nan=True
    )


def _one_source_each(vlm):
    """A one-image prompt, its prefix shared up to [EOI], and one condition per image-side position knocking out
    that position alone (dense [P, 1, T] sources)."""
    batch = vlm.prepare([_image()], ["What color is the shape?"])
    lay = batch.layouts[0]
    prefix = vlm.share_prefix(batch, lay.eoi + 1)
    side = list(range(lay.start, lay.end + 1)) + [lay.eoi]
    sources = torch.zeros(len(side), 1, batch.length, dtype=torch.bool)
    sources[torch.arange(len(side)), 0, torch.tensor(side)] = True
    return batch, prefix, sources


def test_sparse_sources_and_a_reduction_equal_the_dense_logits(loaded):
    vlm = loaded("chameleon")
    batch, prefix, dense = _one_source_each(vlm)
    ones = torch.ones(dense.shape[0], dtype=torch.bool)
    sparse = torch.sparse_coo_tensor(dense.nonzero().T, ones, dense.shape, check_invariants=True)
    full = vlm.forward_knockouts(prefix, dense)
    torch.testing.assert_close(vlm.forward_knockouts(prefix, sparse), full, atol=0, rtol=0)
    top = vlm.forward_knockouts(prefix, sparse, reduce=lambda logits: logits.argmax(-1))
    assert torch.equal(top, full.argmax(-1))
    gens = vlm.generate_knockouts(batch, sparse.index_select(0, torch.arange(3)), max_new_tokens=3)
    assert all(torch.equal(g, d) for g, d in zip(gens, vlm.generate_knockouts(batch, dense[:3], max_new_tokens=3)))


def _tensors(x) -> list[torch.Tensor]:
    """The tensors in ``x`` (nested tuples, lists and dicts)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    return [t for v in x for t in _tensors(v)] if isinstance(x, (tuple, list)) else []


@pytest.mark.parametrize("mode", ["mask", "zero"])
def test_a_suffix_pass_holds_nothing_of_the_pass_before(loaded, mode, monkeypatch):
    """The budget sizes one pass beside the prefix cache: while a pass runs, no mask, additive bias or score buffer
    of the pass before may still be alive (the runner keeps each pass's `Run` for its record until the next one is
    done; before its scratch state was dropped on leaving the call, a gate scan's peak held two passes' masks)."""
    vlm = loaded("chameleon")
    batch, prefix, sources = _one_source_each(vlm)
    fused = mode == "mask" and _fused(prefix.kv[0][0])
    each = vlm.budget.per_condition(
        1, batch.length - prefix.length, batch.length, fused=fused, probs=False, grad=False, knockouts=1, keep=1
    )
    _limited(vlm, monkeypatch, vlm.budget.shape.cache(1, prefix.length) + 5 * each)
    earlier: list = []  # weak references to the shared state of every pass so far
    mine: list = []  # this pass's
    seen = {"passes": 0}
    original_pass, original_attention = vlm.runner.suffix_pass, attention.with_prefix

    def counting(prefix, plan, n, keep=1):
        earlier.extend(mine)
        mine.clear()
        seen["passes"] += 1
        return original_pass(prefix, plan, n, keep)

    def watching(*args, **kwargs):
        alive = [r for r in earlier if r() is not None]
        assert not alive, f"pass {seen['passes']} runs with {len(alive)} tensors of an earlier pass alive"
        out = original_attention(*args, **kwargs)
        scratch = kwargs["scratch"]
        mine.extend(weakref.ref(t) for t in _tensors([scratch.masks, scratch.buffers, scratch.rows]))
        return out

    monkeypatch.setattr(vlm.runner, "suffix_pass", counting)
    monkeypatch.setattr(attention, "with_prefix", watching)
    vlm.forward_knockouts(prefix, sources, mode=mode)
    assert seen["passes"] == -(-sources.shape[0] // 5) > 2 and earlier  # several passes, each with masks to watch
