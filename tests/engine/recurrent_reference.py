"""An independent float64 reference for knockouts through Gated DeltaNet layers: the layer written out by hand.

For every query row ``t`` of a batch example, the row's own view of the sequence is built explicitly — the list
of positions it reads, with the knocked-out sources deleted (``mask``) or kept but silenced (``zero``) — and the
layer is run over that list position by position: the causal convolution as a sum over the list's previous
entries, then the gated delta rule one step at a time, ``S <- exp(g) S; S <- S + b k (v - S^T k)^T; o = S^T q``.
Nothing is shared with the engine (no chunked kernel, no gathers, no grouping of rows). Installed as a forward
hook on each ``linear_attn`` of a separately loaded model, it replaces the whole layer output.

Knockouts come from `reference.EDITS` (``{"mask": [(layers, target [B, T], source [B, T])], "zero": [...]}``),
the same table the attention reference reads, so one setting drives both kinds of layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = x @ layer.weight.double().T
    return out if layer.bias is None else out + layer.bias.double()


def blocked_for(edits: dict, layer: int, b: int, t: int) -> tuple[set[int], set[int]]:
    """The positions row ``t`` of example ``b`` cannot read at ``layer``: (deleted, silenced)."""
    gone: set[int] = set()
    quiet: set[int] = set()
    for mode, into in (("mask", gone), ("zero", quiet)):
        for layers, tgt, src in edits[mode]:
            if (layers is None or layer in layers) and t < tgt.shape[1] and bool(tgt[b, t]):
                into |= set(torch.nonzero(src[b]).flatten().tolist())
    return gone, quiet - gone


def row_output(m, x, beta, g, b: int, t: int, gone: set[int], quiet: set[int]) -> torch.Tensor:
    """The core output (before the gated norm) of row ``t``: the layer over its own list of positions."""
    K = m.conv1d.weight.shape[-1]
    w = m.conv1d.weight[:, 0].double()  # [C, K]; tap K-1 reads the position itself
    seq = [j for j in range(t) if j not in gone] + [t]
    Hv, dk, dv = m.num_v_heads, m.head_k_dim, m.head_v_dim
    S = torch.zeros(Hv, dk, dv, dtype=torch.float64)
    o = None
    for i, p in enumerate(seq):
        pre = w[:, K - 1] * x[b, p]
        for r in range(1, K):
            if i - r >= 0 and seq[i - r] not in quiet:
                pre = pre + w[:, K - 1 - r] * x[b, seq[i - r]]
        if m.conv1d.bias is not None:
            pre = pre + m.conv1d.bias.double()
        act = ACT2FN[m.activation](pre)
        q, k, v = torch.split(act, [m.key_dim, m.key_dim, m.value_dim])
        q = _l2(q.view(-1, dk)).repeat_interleave(Hv // m.num_k_heads, 0) * dk**-0.5
        k = _l2(k.view(-1, dk)).repeat_interleave(Hv // m.num_k_heads, 0)
        v = v.view(Hv, dv)
        blocked = p in gone or p in quiet
        if p not in gone:
            S = S * torch.exp(g[b, p])[:, None, None]
        step = torch.zeros(Hv, dtype=torch.float64) if blocked else beta[b, p]
        mem = (S * k[:, :, None]).sum(1)  # S^T k: [Hv, dv]
        S = S + k[:, :, None] * (step[:, None] * (v - mem))[:, None, :]
        o = (S * q[:, :, None]).sum(1)
    return o


def gated_delta_net(m, hidden: torch.Tensor, pad, layer: int, edits: dict) -> torch.Tensor:
    """The layer's output [B, T, D] for ``hidden`` [B, T, D], every row on its own view (float64 inside)."""
    h = hidden.double()
    if isinstance(pad, torch.Tensor) and pad.dim() == 2:
        h = h * pad[:, :, None].double()
    B, T, _ = h.shape
    x = _linear(m.in_proj_qkv, h)  # [B, T, C]
    z = _linear(m.in_proj_z, h).view(B, T, m.num_v_heads, m.head_v_dim)
    beta = torch.sigmoid(_linear(m.in_proj_b, h))
    g = -torch.exp(m.A_log.double()) * F.softplus(_linear(m.in_proj_a, h) + m.dt_bias.double())
    out = torch.zeros(B, T, m.num_v_heads, m.head_v_dim, dtype=torch.float64)
    for b in range(B):
        full = None
        for t in range(T):
            gone, quiet = blocked_for(edits, layer, b, t)
            if gone or quiet:
                out[b, t] = row_output(m, x, beta, g, b, t, gone, quiet)
                continue
            if full is None:  # rows that block nothing read the whole sequence: one pass gives them all
                full = _all_rows(m, x, beta, g, b)
            out[b, t] = full[t]
    norm = m.norm
    var = out.pow(2).mean(-1, keepdim=True)
    gated = out * torch.rsqrt(var + norm.variance_epsilon) * norm.weight.double()
    gated = gated * ACT2FN[norm.activation](z)
    return _linear(m.out_proj, gated.reshape(B, T, -1)).to(hidden.dtype)


def _all_rows(m, x, beta, g, b: int) -> torch.Tensor:
    """Every row's output on the whole sequence, by the same steps as `row_output` (one pass)."""
    T = x.shape[1]
    K = m.conv1d.weight.shape[-1]
    w = m.conv1d.weight[:, 0].double()
    Hv, dk, dv = m.num_v_heads, m.head_k_dim, m.head_v_dim
    S = torch.zeros(Hv, dk, dv, dtype=torch.float64)
    outs = []
    for p in range(T):
        pre = sum(w[:, K - 1 - r] * x[b, p - r] for r in range(K) if p - r >= 0)
        if m.conv1d.bias is not None:
            pre = pre + m.conv1d.bias.double()
        q, k, v = torch.split(ACT2FN[m.activation](pre), [m.key_dim, m.key_dim, m.value_dim])
        q = _l2(q.view(-1, dk)).repeat_interleave(Hv // m.num_k_heads, 0) * dk**-0.5
        k = _l2(k.view(-1, dk)).repeat_interleave(Hv // m.num_k_heads, 0)
        S = S * torch.exp(g[b, p])[:, None, None]
        mem = (S * k[:, :, None]).sum(1)
        S = S + k[:, :, None] * (beta[b, p][:, None] * (v.view(Hv, dv) - mem))[:, None, :]
        outs.append((S * q[:, :, None]).sum(1))
    return torch.stack(outs)


def install(layers, edits: dict) -> list:
    """Replace every ``linear_attn`` output of ``layers`` by the reference, reading knockouts from ``edits``."""
    handles = []
    for l, layer in enumerate(layers):
        m = getattr(layer, "linear_attn", None)
        if m is None:
            continue

        def hook(module, args, kwargs, output, l=l):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            return gated_delta_net(module, hidden, kwargs.get("attention_mask"), l, edits)

        handles.append(m.register_forward_hook(hook, with_kwargs=True))
    return handles
