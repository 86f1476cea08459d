"""Plain PyTorch hooks on a separately loaded stock model: the independent reference for narrowgate's sites.

Nothing here imports the engine: each site is a forward (pre-)hook on the module that computes it (the decoder
layer for ``resid``, its attention and MLP modules for ``attn_out`` / ``mlp_out``, the attention's output
projection for ``head``), and ``pattern`` is a by-hand float64 eager attention registered under its own name.
The rows a function sees are built here too, one example at a time: the role's positions in the model call's
window (the prompt mask, and every generated token for ``text``), ascending, padded with zeros.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AutoModelForImageTextToText

import narrowgate as ng
from narrowgate.compat import AttentionMaskInterface, eager_mask

PATTERN = "ngtest_pattern"
#: id(attention module) -> the pattern edits active on it (set by `hooked`).
_PATTERN_EDITS: dict[int, list] = {}


@dataclass
class Edit:
    """``fn`` at ``site`` / ``at`` on the positions of ``prompt`` ([B, T] bool), plus generated tokens if ``generated``."""

    site: str
    at: int
    prompt: torch.Tensor
    generated: bool
    fn: object


def stock_model(path, attn: str, *, pattern: bool = False, dtype=torch.float64):
    """A fresh HF model; with ``pattern`` its language model runs the by-hand reference attention."""
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn).eval()
    if pattern:
        sub = "text_config" in model.config.sub_configs
        model.set_attn_implementation({"text_config": PATTERN} if sub else PATTERN)
    return model


def _rows(edit: Edit, offset: int, q: int) -> torch.Tensor:
    B, T = edit.prompt.shape
    out = torch.zeros(B, q, dtype=torch.bool)
    for j in range(q):
        p = offset + j
        out[:, j] = edit.prompt[:, p] if p < T else torch.full((B,), edit.generated)
    return out


def _apply(x: torch.Tensor, axis: int, edit: Edit, offset: int) -> torch.Tensor:
    """``edit.fn`` on the rows of ``x`` (positions ``offset..`` along ``axis``) at the edit's positions."""
    rows = _rows(edit, offset, x.shape[axis])
    per = [torch.nonzero(rows[b]).flatten().tolist() for b in range(x.shape[0])]
    R = max(len(p) for p in per)
    if R == 0:
        return x
    moved = x.movedim(axis, 1)  # [B, Q, ...]
    value = torch.zeros(x.shape[0], R, *moved.shape[2:], dtype=x.dtype)
    positions = torch.full((x.shape[0], R), -1, dtype=torch.long)
    for b, p in enumerate(per):
        for r, q in enumerate(p):
            value[b, r] = moved[b, q]
            positions[b, r] = offset + q
    new = edit.fn(value.movedim(1, axis), ng.Where(edit.site, edit.at, positions, positions >= 0))
    if new is None:
        return x
    new = new.movedim(axis, 1)
    out = moved.clone()
    for b, p in enumerate(per):
        for r, q in enumerate(p):
            out[b, q] = new[b, r]
    return out.movedim(1, axis)


def pattern_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    n = getattr(module, "num_key_value_groups", 1)
    k = key.repeat_interleave(n, dim=1) if n > 1 else key
    v = value.repeat_interleave(n, dim=1) if n > 1 else value
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    w = (query.double() @ k.double().transpose(2, 3)) * scale
    if kwargs.get("softcap") is not None:
        w = torch.tanh(w / kwargs["softcap"]) * kwargs["softcap"]
    if attention_mask is not None:
        m = attention_mask[:, :, :, : k.shape[2]]
        w = w.masked_fill(~m if m.dtype == torch.bool else m < -1, float("-inf"))
    p = torch.softmax(w, dim=-1).nan_to_num(0.0)
    offset = k.shape[2] - query.shape[2]
    for edit in _PATTERN_EDITS.get(id(module), []):
        p = _apply(p, 2, edit, offset)
    out = (p @ v.double()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), p.to(query.dtype)


AttentionInterface.register(PATTERN, pattern_attention)
AttentionMaskInterface.register(PATTERN, eager_mask)


@contextlib.contextmanager
def hooked(model, layers, edits: list[Edit]):
    """``model`` with each edit installed as a plain hook (removed on leaving)."""
    state = {"offset": 0}

    def call(module, args, kwargs):  # a model call's window starts where its attention mask exceeds its tokens
        ids = kwargs.get("input_ids")
        state["offset"] = kwargs["attention_mask"].shape[1] - ids.shape[1]

    handles = [model.register_forward_pre_hook(call, with_kwargs=True)]
    n = len(layers)
    for e in edits:
        if e.site == "resid" and e.at < n:

            def pre(module, args, kwargs, e=e):
                hidden = args[0] if args else kwargs["hidden_states"]
                new = _apply(hidden, 1, e, state["offset"])
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

            handles.append(layers[e.at].register_forward_pre_hook(pre, with_kwargs=True))
        elif e.site in ("resid", "attn_out", "mlp_out"):
            module = (
                layers[-1] if e.site == "resid" else getattr(layers[e.at], {"attn_out": "self_attn"}.get(e.site, "mlp"))
            )

            def post(module, args, output, e=e):
                hidden = output[0] if isinstance(output, tuple) else output
                new = _apply(hidden, 1, e, state["offset"])
                return (new, *output[1:]) if isinstance(output, tuple) else new

            handles.append(module.register_forward_hook(post))
        elif e.site == "head":
            attn = layers[e.at].self_attn

            def head(module, args, e=e, attn=attn):
                x = args[0]
                heads = attn.config.num_attention_heads
                split = x.view(*x.shape[:2], heads, x.shape[-1] // heads)
                return (_apply(split, 1, e, state["offset"]).reshape(x.shape), *args[1:])

            handles.append(attn.o_proj.register_forward_pre_hook(head))
        else:
            _PATTERN_EDITS.setdefault(id(layers[e.at].self_attn), []).append(e)
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        _PATTERN_EDITS.clear()
