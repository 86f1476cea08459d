"""Visiting a site: the rows of a tensor at an intervention's positions, handed to it, written back if replaced.

The layer hooks (``resid``, ``attn_out``, ``mlp_out``) and the attention function (``head``, ``pattern``) meet
the plan's interventions here, in the plan's order, so every site applies the protocol the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .protocol import ROW_AXIS, Where, check_value

if TYPE_CHECKING:
    from .state import Run


def row_index(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Q] bool -> the selected places per row, padded: indices [B, R] (ascending, valid first) and validity [B, R]."""
    counts = rows.sum(1)
    r = int(counts.max()) if rows.numel() else 0
    order = torch.argsort((~rows).to(torch.int8), dim=1, stable=True)[:, :r]
    valid = torch.arange(r, device=rows.device)[None, :] < counts[:, None]
    return order, valid


def gather_rows(x: torch.Tensor, idx: torch.Tensor, axis: int) -> torch.Tensor:
    """The places ``idx`` ([B, R]) of ``x`` along ``axis`` (1 or 2; batch first)."""
    shape = list(x.shape)
    shape[axis] = idx.shape[1]
    view = [idx.shape[0]] + [1] * (x.dim() - 1)
    view[axis] = idx.shape[1]
    return torch.gather(x, axis, idx.to(x.device).view(view).expand(shape))


def put_rows(x: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, new: torch.Tensor, axis: int) -> torch.Tensor:
    """A copy of ``x`` with its places ``idx`` along ``axis`` replaced by ``new`` where ``valid`` (differentiable)."""
    dev = x.device
    b = torch.arange(idx.shape[0], device=dev)[:, None].expand_as(idx)[valid.to(dev)]
    q = idx.to(dev)[valid.to(dev)]
    new = new.to(dev, x.dtype)
    out = x.clone()
    if axis == 1:
        out[b, q] = new[valid.to(dev)]
    else:
        out[b, :, q] = new.transpose(1, 2)[valid.to(dev)]
    return out


def visit(
    run: Run, site: str, at: int, x: torch.Tensor, offset: int, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Let the plan's interventions at ``site``/``at`` visit ``x`` in order; returns ``x`` (a copy where replaced)
    and the [B, Q] mask of the places some intervention replaced (None: none did).

    The places of ``x`` along the site's row axis are the absolute positions ``offset .. offset + Q - 1``, or
    ``positions`` ([B, Q], -1 = none) when the engine computed only some rows (``pattern`` under SDPA).
    """
    todo = run.plan.at_site(site, at)
    if not todo:
        return x, None
    axis = ROW_AXIS[site]
    Q, dev = x.shape[axis], x.device
    changed = None
    for r in todo:
        if positions is None:
            key = (id(r.rows.prompt), offset, Q, str(dev))
            hit = run.scratch.rows.get(key)
            if hit is None:
                window = r.rows.window(offset, offset + Q, dev)
                idx, valid = row_index(window)
                hit = run.scratch.rows[key] = (window, idx, valid, bool(valid.all()), r.rows.prompt)
            rows, idx, valid, full, _ = hit
        else:
            rows = r.rows.at(positions, positions >= 0)
            idx, valid = row_index(rows)
            full = bool(valid.all())
        if idx.shape[1] == 0:
            continue
        absolute = offset + idx if positions is None else torch.gather(positions, 1, idx)
        where = Where(site, at, absolute.masked_fill(~valid, -1), valid)
        run.record.visited.setdefault(id(r), set()).add(at)
        value = gather_rows(x, idx, axis)
        if not full:
            shape = [valid.shape[0]] + [1] * (x.dim() - 1)
            shape[axis] = valid.shape[1]
            value = value.masked_fill(~valid.to(x.device).view(shape), 0)
        new = r.visit(value, where, run.record)
        if new is None:
            continue
        check_value(r, new, value, site)
        x = put_rows(x, idx, valid, new, axis)
        done = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device).scatter_(1, idx, valid)
        changed = done if changed is None else changed | done
    return x, changed
