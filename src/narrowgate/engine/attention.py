"""Attention with knockouts and cross-modal statistics, registered through transformers' public interfaces.

Two implementations are registered: ``narrowgate_sdpa`` (wraps PyTorch SDPA) and
``narrowgate_eager`` (explicit softmax). With no active run, or in a layer no intervention
touches, each one hands the call to the stock ``sdpa``/``eager`` function unchanged.

Exactness of ``zero`` mode under SDPA: zeroing post-softmax weights of a set Z without
renormalising equals SDPA with Z masked out, times the kept mass ``sum_{j not in Z} A_ij`` of
that row. The kept mass needs the attention probabilities of the affected query rows only
(text rows, typically a handful), never the full [T x T] map. Cross-modal statistics use the
same row-wise probabilities.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from .. import compat
from ..compat import AttentionMaskInterface, eager_mask, repeat_kv, sdpa_attention_forward, sdpa_mask
from .state import InterventionError, Scratch, active_run

SDPA = "narrowgate_sdpa"
EAGER = "narrowgate_eager"
#: Stock implementation -> engine implementation wrapping it.
WRAPS = {"sdpa": SDPA, "eager": EAGER}

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


def _stock_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
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


def _allowed(attention_mask, batch: int, q_len: int, k_len: int, offset: int, device) -> torch.Tensor:
    """The model's own mask as a boolean [B, 1, Q, K] (True = may attend)."""
    if attention_mask is None:
        q = torch.arange(offset, offset + q_len, device=device)
        allow = q[:, None] >= torch.arange(k_len, device=device)[None, :]
        return allow[None, None].expand(batch, 1, q_len, k_len)
    m = attention_mask[:, :, :, :k_len]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    return m.expand(batch, 1, q_len, k_len)


def _effective_mask(plan, attention_mask, layer, B, Q, K, offset, device, rows=None):
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


def _row_index(rows: torch.Tensor):
    """[B, Q] bool -> padded row indices [B, R] and validity [B, R]."""
    counts = rows.sum(1)
    r = int(counts.max())
    order = torch.argsort((~rows).to(torch.int8), dim=1, stable=True)[:, :r]
    valid = torch.arange(r, device=rows.device)[None, :] < counts[:, None]
    return order, valid


def _block_rows(budget, rows: int, keys: int, bytes_per_entry: int) -> int:
    """Query rows per block: from the call's memory budget (`engine.budget`), or a fixed size without one."""
    if budget is not None:
        return budget.query_rows(rows, keys, bytes_per_entry)
    return max(1, _FALLBACK_BLOCK // max(1, rows * keys * bytes_per_entry))


def _row_probs(query, key, scaling, allow, idx, zero, weights=None, budget=None):
    """Post-softmax attention (float32, or float64 for float64 inputs) of the selected query rows, in blocks of rows
    (never all at once): their kept mass, with zero-mode entries set to zero ([B,H,R]; 1 without them), and, with
    ``weights`` ([B,R] bool: the rows to count), the column sums of their probabilities over those rows and heads
    ([B,K]; None without).

    query [B,H,Q,d], key [B,H,K,d] (heads already repeated), allow [B,1,Q,K], idx [B,R].
    """
    B, H, _, d = query.shape
    K = key.shape[2]
    step = _block_rows(budget, B, K, 3 * H * 4)  # scores, probabilities and their zeroed copy, every head, float32
    kept, cols = [], None
    for s in range(0, idx.shape[1], step):
        ii = idx[:, s : s + step]
        q = torch.gather(query, 2, ii[:, None, :, None].expand(B, H, ii.shape[1], d))
        scores = torch.matmul(_wide(q), _wide(key).transpose(2, 3)) * scaling
        a = torch.gather(allow, 2, ii[:, None, :, None].expand(B, 1, ii.shape[1], K))
        scores = scores.masked_fill(~a, float("-inf"))
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        if zero is not None:
            z = torch.gather(zero, 1, ii[:, :, None].expand(B, ii.shape[1], K))[:, None]
            p = p.masked_fill(z, 0.0)
        kept.append(p.sum(-1))
        if weights is not None:
            part = (p.sum(1) * weights[:, s : s + step, None]).sum(1)
            cols = part if cols is None else cols + part
    return torch.cat(kept, 2), cols


def _direct(query, key, value, scale, allow, zero, dropout=0.0):
    """Attention of a short query window from its float32 (float64) probabilities (grouped heads, no repeat_kv).

    Returns the output [B, Q, H, dv] and the probabilities [B, H, Q, K] (zero-mode entries zeroed,
    before ``dropout``, which applies to the output only, as in stock attention).
    """
    B, H, Q, d = query.shape
    Hk, K = key.shape[1], key.shape[2]
    g = H // Hk
    q = _wide(query).reshape(B, Hk, g * Q, d)
    scores = (torch.matmul(q, _wide(key).transpose(2, 3)) * scale).view(B, H, Q, K)
    p = torch.softmax(scores.masked_fill(~allow, float("-inf")), dim=-1).nan_to_num(0.0)
    if zero is not None:
        p = p.masked_fill(zero[:, None], 0.0)
    w = torch.nn.functional.dropout(p, p=dropout) if dropout else p
    out = torch.matmul(w.reshape(B, Hk, g * Q, K), _wide(value)).view(B, H, Q, -1)
    return out.transpose(1, 2).to(query.dtype), p


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


def _fill_plan(entries: torch.Tensor, B: int, Hk: int, g: int, device) -> torch.Tensor | None:
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


def _prefix_scores(folded, keys, buffers: dict | None, inplace: bool, wide) -> torch.Tensor:
    """Scores of the folded query rows against the prefix keys, in a buffer of ``buffers`` outside autograd."""
    if not (inplace and buffers is not None and folded.dtype == wide):
        return torch.matmul(folded, keys).to(wide)
    shape = (*folded.shape[:-1], keys.shape[-1])
    buf = buffers.get("scores")
    if buf is None or buf.shape != shape or buf.dtype != wide or buf.device != folded.device:
        buf = buffers["scores"] = torch.empty(shape, dtype=wide, device=folded.device)
    return torch.matmul(folded, keys, out=buf)


def _fused_prefix(folded, pk, pv, allow, cache, low):
    """The prefix part by PyTorch's fused CPU attention (`compat.flash_cpu`), folded rows: its normalised output
    and its log-sum-exp (mask mode only: zero-mode entries would need a second call, slower than by hand)."""
    B, Hk, R, _ = folded.shape
    CB, _, Q, _ = allow.shape
    C, P = CB // B, pk.shape[2]

    def bias():
        keep = _fold_entries(allow[..., :P], B).expand(B, 1, C, R // (C * Q), Q, P).reshape(B, 1, R, P)
        return torch.zeros(B, 1, R, P, dtype=folded.dtype, device=folded.device).masked_fill_(~keep, low)

    out, lse = compat.flash_cpu(folded, pk, pv, 0.0, False, attn_mask=cache("bias", allow, bias), scale=1.0)
    return out, lse[..., None]


def with_prefix(
    query, key, value, prefix, scale, allow, zero, softcap=None, *, probs=False, scratch: Scratch | None = None
):
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
    them, so gradients reach them).
    """
    CB, H, Q, d = query.shape
    pk, pv = prefix
    B, Hk, P, _ = pk.shape
    C, g = CB // B, H // Hk

    def cache(name: str, mask: torch.Tensor, make):  # computed once per pass: every layer shares ``mask``
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
        and (zero is None or not cache("zero_in_prefix", zero, lambda: bool(zero[..., :P].any())))
    )
    if fused:
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
        w = p.to(value.dtype)
        out = _unfold(torch.matmul(_fold(w[..., :P], B, Hk), pv.to(value.dtype)), C, H, Q)
        out = out + torch.matmul(w[..., P:].reshape(CB, Hk, g * Q, Q), value).reshape(CB, H, Q, -1)
        return out.transpose(1, 2), p
    o_pre = _unfold(u_pre, C, H, Q)
    o_own = torch.matmul(e_own.to(value.dtype).reshape(CB, Hk, g * Q, Q), value).reshape(CB, H, Q, -1)
    return (_wide(o_pre) * w_pre + _wide(o_own) * w_own).to(value.dtype).transpose(1, 2), None


def _intervened(module, query, key, value, attention_mask, layer: int, run, eager: bool, scaling, dropout, kwargs):
    softcap = kwargs.get("softcap")
    if softcap is not None and not eager:
        raise InterventionError(
            "Logit soft-capping (softcap) needs eager attention, as in transformers (its SDPA refuses it): load the "
            "model with attn_implementation='eager'."
        )
    B, H, Q, d = query.shape
    plan, record = run.plan, run.record
    K = key.shape[2] + (0 if plan.prefix is None else plan.prefix[layer][0].shape[2])
    offset = K - Q
    device = query.device
    scale = scaling if scaling is not None else d**-0.5
    record.attention_calls.add(layer)

    def masks(rows=None):
        """The effective masks of the call's query rows (all of them, shared by the layers of the call), or of
        the block ``rows`` = (q0, q1) alone."""
        if rows is not None:
            return _effective_mask(plan, attention_mask, layer, B, Q, K, offset, device, rows)
        return run.scratch.cached(
            ("allow", id(attention_mask), plan.active_key(layer), offset, Q, K, str(device)),
            lambda: _effective_mask(plan, attention_mask, layer, B, Q, K, offset, device),
            keep=attention_mask,
        )

    stats_rows = plan.text.window(offset, offset + Q, device) if plan.text is not None else None

    if plan.prefix is not None:
        allow, zero_block = masks()
        out, probs = with_prefix(
            query,
            key,
            value,
            plan.prefix[layer],
            scale,
            allow,
            zero_block,
            softcap,
            probs=plan.record_probs or stats_rows is not None,
            scratch=run.scratch,
        )
        if probs is not None:
            run.record_probs(layer, probs)
        if probs is not None and stats_rows is not None:
            cols = (probs.sum(1) * stats_rows[:, :, None]).sum(1) / stats_rows.sum(1).clamp(min=1)[:, None]
            record.column_attention[layer] = cols.detach()
        return out.contiguous(), None

    if not eager and Q <= DIRECT_ROWS:
        allow, zero_block = masks()
        out, probs = _direct(query, key, value, scale, allow, zero_block, dropout if module.training else 0.0)
        if stats_rows is not None:
            cols = (probs.sum(1) * stats_rows[:, :, None]).sum(1) / stats_rows.sum(1).clamp(min=1)[:, None]
            record.column_attention[layer] = cols.detach()
        return out.contiguous(), None

    groups = getattr(module, "num_key_value_groups", 1)
    k_full, v_full = repeat_kv(key, groups), repeat_kv(value, groups)

    if eager:  # stock eager attention holds every head's [Q, K] weights; this does the same, no more
        allow, zero_block = masks()
        scores = _capped(torch.matmul(query, k_full.transpose(2, 3)) * scale, softcap)
        scores = scores.masked_fill(~allow, torch.finfo(scores.dtype).min)
        w = torch.softmax(_wide(scores), dim=-1)
        w = w.masked_fill(~allow, 0.0)
        if zero_block is not None:
            w = w.masked_fill(zero_block[:, None], 0.0)
        w = w.to(query.dtype)
        out = torch.nn.functional.dropout(w, p=dropout, training=module.training)
        out = torch.matmul(out, v_full).transpose(1, 2).contiguous()
        if plan.text is not None:
            rows = plan.text.window(offset, offset + Q, device)
            cols = (w.float().sum(1) * rows[:, :, None]).sum(1) / rows.sum(1).clamp(min=1)[:, None]
            record.column_attention[layer] = cols.detach()
        return out, w

    # SDPA over blocks of query rows, so that no [Q, K] mask (nor probabilities of many rows) is built whole: per
    # entry the model's mask, the knockouts' blocks, the allowed and final masks, and SDPA's additive float copy.
    step = min(Q, _block_rows(run.scratch.budget, B, K, 8 + len(plan.knockouts_at(layer))))
    outs, cols = [], None
    for q0 in range(0, Q, step):
        q1 = min(Q, q0 + step)
        allow, zero_block = masks() if step >= Q else masks((q0, q1))
        rows = None if stats_rows is None else stats_rows[:, q0:q1]
        out, part = _sdpa_rows(module, query[:, :, q0:q1], k_full, v_full, scale, dropout, allow, zero_block, rows, run)
        outs.append(out)
        if part is not None:
            cols = part if cols is None else cols + part
    if stats_rows is not None:
        cols = torch.zeros(B, K, device=device) if cols is None else cols
        record.column_attention[layer] = (cols / stats_rows.sum(1).clamp(min=1)[:, None]).detach()
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)).contiguous(), None


def _sdpa_rows(module, query, k_full, v_full, scale, dropout, allow, zero_block, stats_rows, run):
    """SDPA for a block of query rows ([B, H, Q, d]; keys with heads repeated) with the block's masks: zero-mode
    rows rescaled by their kept mass. Returns the output [B, Q, H, d] and, with ``stats_rows`` ([B, Q]), the column
    sums over those rows and the heads of their probabilities ([B, K]; None without stats or without such rows)."""
    B, H, Q, _ = query.shape
    final = allow if zero_block is None else allow & ~zero_block[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, k_full, v_full, attn_mask=final, dropout_p=dropout if module.training else 0.0, scale=scale
    )
    out = out.transpose(1, 2)  # [B, Q, H, d]
    out = out.masked_fill(~final.any(-1).transpose(1, 2)[..., None], 0.0)
    zero_rows = zero_block.any(-1) if zero_block is not None else None
    rows = zero_rows
    if stats_rows is not None:
        rows = stats_rows if rows is None else rows | stats_rows
    if rows is None or not bool(rows.any()):
        return out, None
    idx, valid = _row_index(rows)
    weights = None if stats_rows is None else torch.gather(stats_rows, 1, idx) & valid
    kept, cols = _row_probs(query, k_full, scale, allow, idx, zero_block, weights, run.scratch.budget)
    if zero_rows is not None:
        scale_rows = torch.ones(B, Q, H, device=query.device, dtype=kept.dtype)
        sel = torch.gather(zero_rows, 1, idx) & valid  # [B, R]
        factor = torch.where(sel[:, None, :], kept, torch.ones_like(kept))  # [B, H, R]
        scale_rows.scatter_(1, idx[:, :, None].expand(B, idx.shape[1], H), factor.transpose(1, 2))
        out = (_wide(out) * scale_rows[..., None]).to(query.dtype)
    return out, cols


def _make(eager: bool):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        run = active_run()
        layer = None if run is None else run.plan.layer_of.get(id(module))
        if layer is None or not run.plan.attention_active(layer):
            if eager:
                return _stock_eager(
                    module,
                    query,
                    key,
                    value,
                    attention_mask,
                    scaling=scaling,
                    dropout=dropout,
                    softcap=kwargs.get("softcap"),
                )
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        return _intervened(module, query, key, value, attention_mask, layer, run, eager, scaling, dropout, kwargs)

    attention.__name__ = EAGER if eager else SDPA
    return attention


def register() -> None:
    """Register both engine implementations (idempotent)."""
    AttentionInterface.register(SDPA, _make(eager=False))
    AttentionInterface.register(EAGER, _make(eager=True))
    AttentionMaskInterface.register(SDPA, sdpa_mask)
    AttentionMaskInterface.register(EAGER, eager_mask)


register()
