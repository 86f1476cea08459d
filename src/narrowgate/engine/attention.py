"""Attention with knockouts and the ``head``/``pattern`` sites, registered through transformers' public interfaces.

Two implementations are registered: ``narrowgate_sdpa`` (wraps PyTorch SDPA) and
``narrowgate_eager`` (explicit softmax). With no active run, or in a layer no intervention
touches, each one hands the call to the stock ``sdpa``/``eager`` function unchanged. Otherwise
one function per path computes the layer: `_prefix_path` (suffix rows over a shared prefix),
`_eager_path`, `_direct_path` (a short query window under SDPA) and `_sdpa_path`; ``pattern``
interventions visit the probabilities each path has (`sites.visit`), ``head`` interventions the
output before the projection.

Exactness of ``zero`` mode under SDPA: zeroing post-softmax weights of a set Z without
renormalising equals SDPA with Z masked out, times the kept mass ``sum_{j not in Z} A_ij`` of
that row. The kept mass needs the attention probabilities of the affected query rows only
(text rows, typically a handful), never the full [T x T] map. ``pattern`` interventions
(cross-modal statistics, a `Hook`) likewise get the probabilities of their own rows only, and
only the rows they replace are recomputed from the replacement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers import AttentionInterface

from .. import compat
from ..compat import AttentionMaskInterface, eager_mask, repeat_kv, sdpa_attention_forward, sdpa_mask
from . import sites
from .state import InterventionError, Scratch, active_run

if TYPE_CHECKING:
    from .budget import Budget
    from .state import Plan, Run

#: What an attention function returns: the output [B, Q, H, d] and the weights (eager) or None.
AttentionOut = tuple[torch.Tensor, torch.Tensor | None]

SDPA = "narrowgate_sdpa"
EAGER = "narrowgate_eager"
#: Stock implementation -> engine implementation wrapping it.
WRAPS = {"sdpa": SDPA, "eager": EAGER}

#: Attention keyword arguments that change the attention itself and that the engine does not implement: refused by
#: name, since computing without them would silently give another model.
UNIMPLEMENTED = {
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias",
    "indices": "sparse attention",
    "block_indices": "sparse attention",
}

#: Bytes per block of query rows where a call has no memory budget (a `Run` made outside `VLM`).
_FALLBACK_BLOCK = 1 << 26
#: Query windows up to this many rows (decode steps, text suffixes) are computed directly from their
#: probabilities, which they need anyway for zero-mode knockouts and statistics.
DIRECT_ROWS = 32


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the accumulation precision: float32, or float64 for float64 inputs (exact references)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Attention logits soft-capped to (-softcap, softcap) as Gemma 2 does (``softcap * tanh(s / softcap)``)."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def _stock_eager(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention (additive float mask, optional logit soft-capping), shared by every decoder family."""
    groups = getattr(module, "num_key_value_groups", 1)
    k, v = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    w = _capped(torch.matmul(query, k.transpose(2, 3)) * scale, softcap)
    if attention_mask is not None:
        w = w + attention_mask[:, :, :, : k.shape[-2]]
    w = torch.softmax(_wide(w), dim=-1).to(query.dtype)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, v).transpose(1, 2).contiguous(), w


def _allowed(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, k_len: int, offset: int, device: torch.device
) -> torch.Tensor:
    """The model's own mask as a boolean [B, 1, Q, K] (True = may attend)."""
    if attention_mask is None:
        q = torch.arange(offset, offset + q_len, device=device)
        allow = q[:, None] >= torch.arange(k_len, device=device)[None, :]
        return allow[None, None].expand(batch, 1, q_len, k_len)
    m = attention_mask[:, :, :, :k_len]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    return m.expand(batch, 1, q_len, k_len)


def _effective_mask(
    plan: Plan,
    attention_mask: torch.Tensor | None,
    layer: int,
    B: int,
    Q: int,
    K: int,
    offset: int,
    device: torch.device,
    rows: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's mask minus mask-mode knockouts ([B,1,Q,K]) and the zero-mode entries ([B,Q,K] or None); with
    ``rows`` = (q0, q1), for query rows q0..q1-1 of the call only ([B,1,q1-q0,K])."""
    if rows is not None:
        q0, q1 = rows
        if attention_mask is not None and attention_mask.shape[2] > 1:
            attention_mask = attention_mask[:, :, q0:q1]
        Q, offset = q1 - q0, offset + q0
    allow = _allowed(attention_mask, B, Q, K, offset, device)
    mask_block, zero_block = plan.blocks(layer, offset, Q, K, device)
    if mask_block is not None:
        allow = allow & ~mask_block[:, None]
    return allow, zero_block


def _block_rows(budget: Budget | None, rows: int, keys: int, bytes_per_entry: int) -> int:
    """Query rows per block: from the call's memory budget (`engine.budget`), or a fixed size without one."""
    if budget is not None:
        return budget.query_rows(rows, keys, bytes_per_entry)
    return max(1, _FALLBACK_BLOCK // max(1, rows * keys * bytes_per_entry))


def _row_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    allow: torch.Tensor,
    idx: torch.Tensor,
    zero: torch.Tensor | None,
    budget: Budget | None = None,
    *,
    probs: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Post-softmax attention (float32, or float64 for float64 inputs) of the selected query rows, zero-mode entries
    set to zero, computed in blocks of rows sized by ``budget``.

    query [B,H,Q,d], key [B,H,K,d] (heads already repeated), idx [B,R] (rows of ``query``); allow [B,1,R,K] and zero
    [B,R,K] (or None): the masks of those rows. Returns the probabilities [B,H,R,K] (None without ``probs``: then no
    more than one block's exist at a time) and the kept mass (before zeroing would be 1) [B,H,R].
    """
    B, H, _, d = query.shape
    K = key.shape[2]
    step = _block_rows(budget, B, K, 3 * H * 4)  # scores, probabilities and their zeroed copy, every head, float32
    out: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    for s in range(0, idx.shape[1], step):
        ii = idx[:, s : s + step]
        q = torch.gather(query, 2, ii[:, None, :, None].expand(B, H, ii.shape[1], d))
        scores = torch.matmul(_wide(q), _wide(key).transpose(2, 3)) * scaling
        p = torch.softmax(scores.masked_fill(~allow[:, :, s : s + step], float("-inf")), dim=-1).nan_to_num(0.0)
        if zero is not None:
            p = p.masked_fill(zero[:, None, s : s + step], 0.0)
        if probs:
            out.append(p)
        kept.append(p.sum(-1))
    return (torch.cat(out, 2) if probs else None), torch.cat(kept, 2)


def _rows_of(x: torch.Tensor, idx: torch.Tensor, axis: int) -> torch.Tensor:
    """The rows ``idx`` ([B, R]) of a mask ``x`` along ``axis`` (``allow`` [B,1,Q,K]: 2; ``zero`` [B,Q,K]: 1)."""
    shape = list(x.shape)
    shape[axis] = idx.shape[1]
    view = [idx.shape[0]] + [1] * (x.dim() - 1)
    view[axis] = idx.shape[1]
    return torch.gather(x, axis, idx.view(view).expand(shape))


def _direct_probs(
    query: torch.Tensor, key: torch.Tensor, scale: float, allow: torch.Tensor, zero: torch.Tensor | None
) -> torch.Tensor:
    """Post-softmax attention [B, H, Q, K] of a short query window in float32 (float64 for float64 inputs),
    zero-mode entries zeroed, with grouped heads read in place (no repeat_kv)."""
    B, H, Q, d = query.shape
    Hk, K = key.shape[1], key.shape[2]
    q = _wide(query).reshape(B, Hk, (H // Hk) * Q, d)
    scores = (torch.matmul(q, _wide(key).transpose(2, 3)) * scale).view(B, H, Q, K)
    p = torch.softmax(scores.masked_fill(~allow, float("-inf")), dim=-1).nan_to_num(0.0)
    return p if zero is None else p.masked_fill(zero[:, None], 0.0)


def _weighted(p: torch.Tensor, value: torch.Tensor, dropout: float) -> torch.Tensor:
    """``p`` [B, H, Q, K] applied to ``value`` [B, Hk, K, dv] (grouped heads in place): [B, Q, H, dv], in ``value``'s
    dtype; ``dropout`` applies to the weights, as in stock attention."""
    B, H, Q, K = p.shape
    Hk = value.shape[1]
    w = torch.nn.functional.dropout(p, p=dropout) if dropout else p
    out = torch.matmul(w.reshape(B, Hk, (H // Hk) * Q, K), _wide(value)).view(B, H, Q, -1)
    return out.transpose(1, 2).to(value.dtype)


def _fold(x: torch.Tensor, B: int, Hk: int) -> torch.Tensor:
    """[C*B, H, Q, n] (rows condition-major, H = Hk * g) -> [B, Hk, C*g*Q, n]: every condition's rows of one
    example stacked along the query axis, so they meet that example's shared prefix in one matmul."""
    CB, H, Q, n = x.shape
    C, g = CB // B, H // Hk
    return x.reshape(C, B, Hk, g, Q, n).permute(1, 2, 0, 3, 4, 5).reshape(B, Hk, C * g * Q, n)


def _unfold(x: torch.Tensor, C: int, H: int, Q: int) -> torch.Tensor:
    """Inverse of `_fold`: [B, Hk, C*g*Q, n] -> [C*B, H, Q, n]."""
    B, Hk, _, n = x.shape
    g = H // Hk
    return x.reshape(B, Hk, C, g, Q, n).permute(2, 0, 1, 3, 4, 5).reshape(C * B, H, Q, n)


def _fold_entries(entries: torch.Tensor, B: int) -> torch.Tensor:
    """[C*B, 1, Q, n] -> a [B, 1, C, 1, Q, n] view that broadcasts against folded rows viewed [B, Hk, C, g, Q, n]."""
    CB, _, Q, n = entries.shape
    return entries.reshape(CB // B, B, 1, Q, n).permute(1, 2, 0, 3, 4).unsqueeze(3)


def _fill_plan(entries: torch.Tensor, B: int, Hk: int, g: int, device: torch.device) -> torch.Tensor | None:
    """Where to write ``entries`` ([C*B, 1, Q, P], True = set) in folded rows [B, Hk, C*g*Q, P]: None (nowhere),
    flat indices (few entries: a scan blocks one column per condition) or a broadcast bool mask (many)."""
    hit = entries.nonzero()
    if len(hit) == 0:
        return None
    CB, _, Q, P = entries.shape
    if len(hit) * 16 >= entries.numel():
        return _fold_entries(entries, B).to(device)
    cb, q, p = hit[:, 0], hit[:, 2], hit[:, 3]
    h = torch.arange(Hk)[:, None, None]
    gi = torch.arange(g)[None, :, None]
    return ((((((cb % B) * Hk + h) * (CB // B) + cb // B) * g + gi) * Q + q) * P + p).reshape(-1).to(device)


def _fill(x: torch.Tensor, where: torch.Tensor | None, value: float, inplace: bool) -> torch.Tensor:
    """``x`` (folded rows [B, Hk, C*g*Q, P]) with the places of `_fill_plan` set to ``value``."""
    if where is None:
        return x
    if where.dtype != torch.bool:
        flat = x.view(-1)
        return (flat.index_fill_(0, where, value) if inplace else flat.index_fill(0, where, value)).view(x.shape)
    B, Hk, _, P = x.shape
    _, _, C, _, Q, _ = where.shape
    rows = x.view(B, Hk, C, -1, Q, P)
    return (rows.masked_fill_(where, value) if inplace else rows.masked_fill(where, value)).view(x.shape)


def _prefix_scores(
    folded: torch.Tensor, keys: torch.Tensor, buffers: dict | None, inplace: bool, wide: torch.dtype
) -> torch.Tensor:
    """Scores of the folded query rows against the prefix keys, in a buffer of ``buffers`` outside autograd."""
    if not (inplace and buffers is not None and folded.dtype == wide):
        return torch.matmul(folded, keys).to(wide)
    shape = (*folded.shape[:-1], keys.shape[-1])
    buf = buffers.get("scores")
    if buf is None or buf.shape != shape or buf.dtype != wide or buf.device != folded.device:
        buf = buffers["scores"] = torch.empty(shape, dtype=wide, device=folded.device)
    return torch.matmul(folded, keys, out=buf)


#: A per-pass cache of what every layer shares: (name, the mask it is keyed on, how to make it) -> the value.
PassCache = Callable[[str, torch.Tensor, Callable[[], Any]], Any]


def _fused_prefix(
    folded: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, allow: torch.Tensor, cache: PassCache, low: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix part by PyTorch's fused CPU attention (`compat.flash_cpu`), folded rows: its normalised output
    and its log-sum-exp (mask mode only: zero-mode entries would need a second call, slower than by hand)."""
    B, Hk, R, _ = folded.shape
    CB, _, Q, _ = allow.shape
    C, P = CB // B, pk.shape[2]

    def bias() -> torch.Tensor:
        keep = _fold_entries(allow[..., :P], B).expand(B, 1, C, R // (C * Q), Q, P).reshape(B, 1, R, P)
        return torch.zeros(B, 1, R, P, dtype=folded.dtype, device=folded.device).masked_fill_(~keep, low)

    out, lse = compat.flash_cpu(folded, pk, pv, 0.0, False, attn_mask=cache("bias", allow, bias), scale=1.0)
    return out, lse[..., None]


def with_prefix(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prefix: tuple[torch.Tensor, torch.Tensor],
    scale: float,
    allow: torch.Tensor,
    zero: torch.Tensor | None,
    softcap: float | None = None,
    *,
    probs: bool = False,
    scratch: Scratch | None = None,
    edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of suffix rows over a prefix shared by every condition plus each row's own suffix.

    query [C*B, H, Q, d]; key/value [C*B, Hk, Q, d] (the suffix only); ``prefix`` = (keys, values)
    [B, Hk, P, d] of the shared prefix, never expanded over conditions; allow [C*B, 1, Q, P+Q].
    Every condition's rows of an example are folded into one query block against that example's prefix,
    and the two parts (prefix, own suffix) are merged exactly by their log-sum-exp, so no score is ever
    concatenated or copied. Each part gives an unnormalised output U, a log-offset t and its log-normaliser
    n (its output is U e^t; its share of the softmax denominator e^n; zero-mode entries leave U, not n).
    The prefix part runs in PyTorch's fused CPU attention where it can (no scores in memory at all; not with
    zero-mode entries in the prefix, probabilities, autograd or soft-capping); otherwise its scores live in
    one reused buffer and are exponentiated in place. ``scratch`` (the call's `Scratch`) keeps that buffer and
    the per-pass masks every layer shares. Returns the output [C*B, Q, H, dv] and, with ``probs``, the
    probabilities [C*B, H, Q, P+Q] (float32, zero-mode entries zeroed; the output is then computed from
    them, so gradients reach them). ``edit`` (implies ``probs``) maps the probabilities to those the output
    is computed from (the ``pattern`` site).
    """
    probs = probs or edit is not None
    CB, H, Q, d = query.shape
    pk, pv = prefix
    B, Hk, P, _ = pk.shape
    C, g = CB // B, H // Hk

    def cache(name: str, mask: torch.Tensor, make: Callable[[], Any]) -> Any:  # once per pass: layers share ``mask``
        return make() if scratch is None else scratch.cached((name, id(mask)), make, keep=mask)

    inplace = not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, pk, pv)))
    wide = torch.promote_types(query.dtype, torch.float32)
    low = torch.finfo(wide).min
    folded, keys = _fold(query * scale, B, Hk), pk.to(query.dtype)
    fused = (
        compat.flash_cpu is not None
        and inplace
        and not probs
        and softcap is None
        and query.device.type == "cpu"
        and query.dtype == wide
        and pv.shape[-1] == d  # the fused kernel wants one head size (not MLA's: DeepSeek-V3 keys 192, values 128)
        and (zero is None or not cache("zero_in_prefix", zero, lambda: bool(zero[..., :P].any())))
    )
    if fused:
        u_pre: torch.Tensor | None
        n_pre: torch.Tensor | None
        u_pre, t_pre = _fused_prefix(folded, keys, pv.to(value.dtype), allow, cache, low)
        n_pre = None  # normalised: its log-normaliser is its log-offset
    else:
        pre = _capped(
            _prefix_scores(folded, keys.transpose(2, 3), None if scratch is None else scratch.buffers, inplace, wide),
            softcap,
        )
        blocked = cache("blocked", allow, lambda: _fill_plan(~allow[..., :P], B, Hk, g, query.device))
        pre = _fill(pre, blocked, low, inplace)
        t_pre = pre.amax(-1, keepdim=True)
        e_pre = pre.sub_(t_pre).exp_() if inplace else torch.exp(pre - t_pre)
        n_pre = t_pre + torch.log(e_pre.sum(-1, keepdim=True))
        if zero is not None:  # zero mode: the entries leave the numerator, not the normaliser
            where = cache("zero", zero, lambda: _fill_plan(zero[:, None, :, :P], B, Hk, g, query.device))
            e_pre = _fill(e_pre, where, 0.0, inplace)
        u_pre = None if probs else torch.matmul(e_pre.to(value.dtype), pv.to(value.dtype))
    own = _capped(_wide(torch.matmul(query.reshape(CB, Hk, g * Q, d), key.transpose(2, 3))) * scale, softcap)
    own = own.view(CB, H, Q, Q).masked_fill(~allow[..., P:], low)
    t_own = own.amax(-1, keepdim=True)
    e_own = torch.exp(own - t_own)
    n_own = t_own + torch.log(e_own.sum(-1, keepdim=True))
    if zero is not None:
        e_own = e_own.masked_fill(zero[:, None, :, P:], 0.0)
    t_pre = _unfold(t_pre, C, H, Q)
    n_pre = t_pre if n_pre is None else _unfold(n_pre, C, H, Q)
    top = torch.maximum(n_pre, n_own)
    empty = ~allow.any(-1, keepdim=True)  # a row with no key left attends to nothing (output zero)
    norm = (torch.exp(n_pre - top) + torch.exp(n_own - top)).masked_fill(empty, 1.0)
    w_pre = (torch.exp(t_pre - top) / norm).masked_fill(empty, 0.0)
    w_own = (torch.exp(t_own - top) / norm).masked_fill(empty, 0.0)
    if probs:
        p = torch.cat([_unfold(e_pre, C, H, Q) * w_pre, e_own * w_own], -1)
        if edit is not None:
            p = edit(p)
        w = p.to(value.dtype)
        out = _unfold(torch.matmul(_fold(w[..., :P], B, Hk), pv.to(value.dtype)), C, H, Q)
        out = out + torch.matmul(w[..., P:].reshape(CB, Hk, g * Q, Q), value).reshape(CB, H, Q, -1)
        return out.transpose(1, 2), p
    assert u_pre is not None  # computed whenever the probabilities are not asked for
    o_pre = _unfold(u_pre, C, H, Q)
    o_own = torch.matmul(e_own.to(value.dtype).reshape(CB, Hk, g * Q, Q), value).reshape(CB, H, Q, -1)
    return (_wide(o_pre) * w_pre + _wide(o_own) * w_own).to(value.dtype).transpose(1, 2), None


def _refuse_unimplemented(kwargs: dict[str, Any]) -> None:
    for name, what in UNIMPLEMENTED.items():
        if kwargs.get(name) is not None:
            raise InterventionError(
                f"This model passes {what} ({name!r}) to its attention, which narrowgate's attention does not "
                "implement; running it through narrowgate would compute another model."
            )


class _Layer:
    """One engine attention call: the inputs, the masks the plan gives this layer, and the run."""

    def __init__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        layer: int,
        run: Run,
        scaling: float | None,
        dropout: float,
        softcap: float | None,
    ) -> None:
        self.module, self.query, self.key, self.value = module, query, key, value
        self.layer, self.run, self.softcap = layer, run, softcap
        plan = run.plan
        B, _, Q, d = query.shape
        K = key.shape[2] + (0 if plan.prefix is None else plan.prefix[layer][0].shape[2])
        self.offset, self.scale = K - Q, scaling if scaling is not None else d**-0.5
        self.dropout = dropout if module.training else 0.0
        self.knocked = bool(plan.active_key(layer))
        self.patterns = bool(plan.at_site("pattern", layer))
        self.attention_mask, self.K = attention_mask, K
        self._masks: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def masks(self, rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The effective masks (`_effective_mask`) of the call's query rows — all of them, shared by the layers of
        the call, or only the block ``rows`` = (q0, q1) — made when a path asks (the blocked SDPA path never
        asks for all of a long window)."""
        plan, (B, _, Q, _), dev = self.run.plan, self.query.shape, self.query.device
        if rows is not None:
            return _effective_mask(plan, self.attention_mask, self.layer, B, Q, self.K, self.offset, dev, rows)
        if self._masks is None:
            self._masks = self.run.scratch.cached(
                ("allow", id(self.attention_mask), plan.active_key(self.layer), self.offset, Q, self.K, str(dev)),
                lambda: _effective_mask(plan, self.attention_mask, self.layer, B, Q, self.K, self.offset, dev),
                keep=self.attention_mask,
            )
        return self._masks

    @property
    def allow(self) -> torch.Tensor:
        return self.masks()[0]

    @property
    def zero(self) -> torch.Tensor | None:
        return self.masks()[1]

    def visit_pattern(
        self, p: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ``pattern`` interventions on probabilities ``p`` [B, H, rows, K]: (probabilities, replaced rows)."""
        return sites.visit(self.run, "pattern", self.layer, p, self.offset, positions)


def _prefix_path(c: _Layer, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> AttentionOut:
    """Suffix rows over a prefix shared by every row (`with_prefix`)."""
    plan = c.run.plan
    assert plan.prefix is not None  # the path `_intervened` takes only with a shared prefix
    out, probs = with_prefix(
        c.query,
        c.key,
        c.value,
        plan.prefix[c.layer],
        c.scale,
        c.allow,
        c.zero,
        c.softcap,
        probs=plan.record_probs,
        scratch=c.run.scratch,
        edit=(lambda p: c.visit_pattern(p)[0]) if c.patterns else None,
    )
    if probs is not None:
        c.run.record_probs(c.layer, probs)
    return out, None


def _direct_path(c: _Layer, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> AttentionOut:
    """A short query window (decode steps, text suffixes) from its probabilities, which it needs anyway."""
    p, _ = c.visit_pattern(_direct_probs(c.query, c.key, c.scale, c.allow, c.zero))
    return _weighted(p, c.value, c.dropout), None


def _eager_path(c: _Layer, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> AttentionOut:
    """Explicit softmax over the whole map, as stock eager attention computes (its weights are returned)."""
    groups = getattr(c.module, "num_key_value_groups", 1)
    k, v = repeat_kv(c.key, groups), repeat_kv(c.value, groups)
    scores = _capped(torch.matmul(c.query, k.transpose(2, 3)) * c.scale, c.softcap)
    scores = scores.masked_fill(~c.allow, torch.finfo(scores.dtype).min)
    w = torch.softmax(_wide(scores), dim=-1).masked_fill(~c.allow, 0.0)
    if c.zero is not None:
        w = w.masked_fill(c.zero[:, None], 0.0)
    w, _ = c.visit_pattern(w)
    w = w.to(c.query.dtype)
    out = torch.nn.functional.dropout(w, p=c.dropout) if c.dropout else w
    return torch.matmul(out, v).transpose(1, 2).contiguous(), w


def _sdpa_path(c: _Layer, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> AttentionOut:
    """SDPA over the whole window: stock where no knockout acts here, else in blocks of query rows sized by the
    memory budget, each with its own masks, so no [Q, K] mask is built whole. By hand only the rows that need
    their probabilities: zero-mode rows (rescaled by their kept mass, block by block) and the rows of ``pattern``
    interventions (their masks gathered over the blocks, visited once)."""
    query, run = c.query, c.run
    B, H, Q, _ = query.shape
    groups = getattr(c.module, "num_key_value_groups", 1)
    k_full, v_full = repeat_kv(c.key, groups), repeat_kv(c.value, groups)
    pattern = None
    for r in run.plan.at_site("pattern", c.layer):
        mine = r.rows.window(c.offset, c.offset + Q, query.device)
        pattern = mine if pattern is None else pattern | mine
    if pattern is not None and not bool(pattern.any()):
        pattern = None
    stock = None
    if not c.knocked:
        stock, _ = sdpa_attention_forward(
            c.module, query, c.key, c.value, attention_mask, scaling=c.scale, dropout=c.dropout, **kwargs
        )
        if pattern is None:
            return stock.contiguous(), None
    # per entry: the model's mask, the knockouts' blocks, the allowed and final masks, SDPA's additive float copy
    step = min(Q, _block_rows(run.scratch.budget, B, c.K, 8 + len(run.plan.knockouts_at(c.layer))))
    outs, picked, zeros = [], [], []
    for q0 in range(0, Q, step):
        q1 = min(Q, q0 + step)
        allow, zero = c.masks() if step >= Q else c.masks((q0, q1))
        if stock is None:
            outs.append(_sdpa_block(c, query[:, :, q0:q1], k_full, v_full, allow, zero))
        if pattern is not None and bool(pattern[:, q0:q1].any()):
            idx, valid = sites.row_index(pattern[:, q0:q1])
            picked.append((idx + q0, valid, _rows_of(allow, idx, 2)))
            if zero is not None:
                zeros.append(_rows_of(zero, idx, 1))
    out = stock if stock is not None else outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    if not picked:
        return out.contiguous(), None
    idx, valid = torch.cat([p[0] for p in picked], 1), torch.cat([p[1] for p in picked], 1)
    allow = torch.cat([p[2] for p in picked], 2)
    zero = torch.cat(zeros, 1) if zeros else None
    picked_probs, _ = _row_probs(query, k_full, c.scale, allow, idx, zero, run.scratch.budget)
    assert picked_probs is not None  # asked for (probs=True)
    probs, changed = c.visit_pattern(picked_probs, (c.offset + idx).masked_fill(~valid, -1))
    if changed is not None:
        w = torch.nn.functional.dropout(probs, p=c.dropout) if c.dropout else probs
        redone = torch.matmul(w, _wide(v_full)).transpose(1, 2)  # [B, R, H, d]
        out = sites.put_rows(out, idx, valid & changed, redone, axis=1)
    return out.contiguous(), None


def _sdpa_block(
    c: _Layer,
    query: torch.Tensor,
    k_full: torch.Tensor,
    v_full: torch.Tensor,
    allow: torch.Tensor,
    zero: torch.Tensor | None,
) -> torch.Tensor:
    """SDPA for one block of query rows ([B, H, q, d]) with the block's masks, zero-mode rows rescaled by their
    kept mass: the output [B, q, H, d]."""
    B, H, Q, _ = query.shape
    final = allow if zero is None else allow & ~zero[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, k_full, v_full, attn_mask=final, dropout_p=c.dropout, scale=c.scale
    ).transpose(1, 2)  # [B, Q, H, d]
    out = out.masked_fill(~final.any(-1).transpose(1, 2)[..., None], 0.0)
    if zero is None:
        return out
    rows = zero.any(-1)
    if not bool(rows.any()):
        return out
    idx, valid = sites.row_index(rows)
    _, kept = _row_probs(
        query, k_full, c.scale, _rows_of(allow, idx, 2), idx, _rows_of(zero, idx, 1), c.run.scratch.budget, probs=False
    )
    scale_rows = torch.ones(B, Q, H, device=query.device, dtype=kept.dtype)
    factor = torch.where(valid[:, None, :], kept, torch.ones_like(kept))  # [B, H, R]
    scale_rows.scatter_(1, idx[:, :, None].expand(B, idx.shape[1], H), factor.transpose(1, 2))
    return (_wide(out) * scale_rows[..., None]).to(query.dtype)


def _intervened(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: int,
    run: Run,
    eager: bool,
    scaling: float | None,
    dropout: float,
    kwargs: dict[str, Any],
) -> AttentionOut:
    softcap = kwargs.get("softcap")
    if softcap is not None and not eager:
        raise InterventionError(
            "Logit soft-capping (softcap) needs eager attention, as in transformers (its SDPA refuses it): load the "
            "model with attn_implementation='eager'."
        )
    if attention_mask is None and (kwargs.get("is_causal") is False or not getattr(module, "is_causal", True)):
        raise InterventionError(
            "This layer's attention is not causal and comes without a mask; narrowgate's attention cannot compute it."
        )
    c = _Layer(module, query, key, value, attention_mask, layer, run, scaling, dropout, softcap)
    if run.plan.prefix is not None:
        path = _prefix_path
    elif eager:
        path = _eager_path
    elif query.shape[2] <= DIRECT_ROWS:
        path = _direct_path
    else:
        path = _sdpa_path
    return path(c, attention_mask, kwargs)


def _stock(
    eager: bool,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    kwargs: dict[str, Any],
) -> AttentionOut:
    if eager:
        return _stock_eager(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, softcap=kwargs.get("softcap")
        )
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _make(eager: bool) -> Callable[..., AttentionOut]:
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> AttentionOut:
        _refuse_unimplemented(kwargs)
        run = active_run()
        layer = None if run is None else run.plan.layer_of.get(id(module))
        if run is None or layer is None:
            return _stock(eager, module, query, key, value, attention_mask, scaling, dropout, kwargs)
        plan = run.plan
        if plan.attention_active(layer):
            run.record.attention_calls.add(layer)
            out, w = _intervened(module, query, key, value, attention_mask, layer, run, eager, scaling, dropout, kwargs)
        else:
            out, w = _stock(eager, module, query, key, value, attention_mask, scaling, dropout, kwargs)
        if plan.at_site("head", layer):
            run.record.attention_calls.add(layer)
            offset = key.shape[2] + (0 if plan.prefix is None else plan.prefix[layer][0].shape[2]) - query.shape[2]
            out, _ = sites.visit(run, "head", layer, out, offset)
        return out, w

    attention.__name__ = EAGER if eager else SDPA
    return attention


def register() -> None:
    """Register both engine implementations (idempotent)."""
    AttentionInterface.register(SDPA, _make(eager=False))
    AttentionInterface.register(EAGER, _make(eager=True))
    AttentionMaskInterface.register(SDPA, sdpa_mask)
    AttentionMaskInterface.register(EAGER, eager_mask)


register()
