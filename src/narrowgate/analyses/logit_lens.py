"""Logit lens: at which depth does a position start to name the image's class?

The residual at each role (``eoi`` and ``last`` by default, ``--roles`` to choose) and every residual
index is read out through the model's own final norm and unembedding (nostalgebraist 2020), on the
class prompt. Per residual index and role: the mean log-probability of the first token of
" <class name>" and its median rank in the whole vocabulary (0 = the top token). A first token shared
by several classes (" great", " American") still measures the class-naming direction; the rank is in
the vocabulary, not among the classes, so shared tokens do not decide a winner. At the last residual
index the read-out of ``last`` is the model's own next-token distribution (tokens the model never
predicts, such as Chameleon's image codes, are left out of every read-out as the model leaves them out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..data.prompts import class_prompt, name_ids
from ..engine.interventions import Capture
from ..errors import OptionError
from ..roles import parse_role
from .base import Experiment, Sample, Unit, register, stack
from .options import ClassPrompt, RunConfig, option

if TYPE_CHECKING:
    from ..store import RunStore, Shard
    from ..vlm import VLM


@dataclass
class LogitLensConfig(ClassPrompt, RunConfig):
    """Settings of ``narrowgate run logit-lens``."""

    n_per_class: int | None = option(20, "Images per class.", min=1)
    roles: list[str] | None = option(
        None, "Single-position role to read out (repeatable; default eoi and last).", parse="roles"
    )


def suppressed(logits: torch.Tensor) -> torch.Tensor:
    """[V] tokens the model itself never predicts (e.g. Chameleon's image codes get the lowest logit)."""
    return (logits.float() <= torch.finfo(logits.dtype).min / 2).all(0)


def read_out(vlm: VLM, residuals: torch.Tensor, never: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities [..., V] of residual vectors [..., D] through the final norm and the unembedding,
    over the tokens the model can predict (``never``: the `suppressed` ones, excluded as the model does)."""
    norm = vlm.family.final_norm(vlm.model)
    head = vlm.model.get_output_embeddings()
    param = next(head.parameters())
    h = residuals.to(param.device, param.dtype)
    with torch.no_grad():
        logits = head(norm(h) if norm is not None else h).float().cpu()
    if never is not None:
        logits = logits.masked_fill(never, float("-inf"))
    return torch.log_softmax(logits, -1)


@register
class LogitLens(Experiment[LogitLensConfig]):
    """At which depth does a position start to name the image's class?"""

    name = "logit-lens"
    task = "classes"
    prompts = ("class",)
    config = LogitLensConfig
    curve = ("logit_lens", "logp", "role")

    def _roles(self, cfg: LogitLensConfig) -> tuple[str, ...]:
        roles = tuple(cfg.roles or ("eoi", "last"))
        for r in roles:
            if not parse_role(r).single:
                raise OptionError(
                    f"--roles {r}: the logit lens reads one position per example; give a single-position "
                    "role such as eoi, last, last_image or image[k]."
                )
        return roles

    def check(self, examples: Sample, cfg: LogitLensConfig) -> None:
        """Refuse a role that is not one position per example."""
        self._roles(cfg)

    def process(
        self, vlm: VLM, units: list[Unit], images: list[tuple], cfg: LogitLensConfig
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per example and role, the log-probability and vocabulary rank of the class name's first token read out
        at every residual index."""
        roles = self._roles(cfg)
        batch = vlm.prepare([im[0] for im in images], [class_prompt(cfg.prompt, cfg.data)] * len(units))
        out = vlm.forward(batch, capture=Capture(roles))
        res, never = out.residuals, suppressed(out.logits[:, -1].cpu())
        tok = vlm.family.tokenizer
        first = torch.tensor([name_ids(tok, u.examples[0].word)[0] for u in units])
        rows = [{"example_id": u.id, "label": u.examples[0].label, "token": int(t)} for u, t in zip(units, first)]
        arrays: dict[str, Any] = {}
        for role in roles:
            logp = read_out(vlm, res[role], never)  # [B, L+1, V]
            own = logp.gather(-1, first[:, None, None].expand(-1, logp.shape[1], 1))[..., 0]
            arrays[f"logp:{role}"] = own.numpy().astype(np.float32)
            arrays[f"rank:{role}"] = (logp > own[..., None]).sum(-1).numpy().astype(np.float32)
        return rows, arrays

    def aggregate(self, records: Shard, cfg: LogitLensConfig, info: dict[str, Any]) -> dict[str, pd.DataFrame]:
        """Table ``logit_lens``: per role and residual index, the mean log-probability, median rank and top-1
        share."""
        rows = []
        for role in self._roles(cfg):
            logp, rank = stack(records.arrays, f"logp:{role}"), stack(records.arrays, f"rank:{role}")
            for l in range(logp.shape[1]):
                rows.append(
                    {
                        "resid": l,
                        "role": role,
                        "logp": float(logp[:, l].mean()),
                        "median_rank": float(np.median(rank[:, l])),
                        "top1": float((rank[:, l] == 0).mean()),
                        "n": len(logp),
                    }
                )
        return {"logit_lens": pd.DataFrame(rows)}

    def figures(
        self, tables: dict[str, pd.DataFrame], info: dict[str, Any], store: RunStore, cfg: LogitLensConfig
    ) -> list[str]:
        """Log-probability and rank of the class per residual index, one line per role."""
        from ..plots import COLORS, RESID, has, plt, save

        if not has(tables, "logit_lens"):
            return []
        df = tables["logit_lens"]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        for i, (role, g) in enumerate(df.groupby("role", sort=False)):
            a.plot(g["resid"], g["logp"], "-o", ms=3, color=COLORS[i % len(COLORS)], label=role)
            b.plot(g["resid"], g["median_rank"] + 1, "-o", ms=3, color=COLORS[i % len(COLORS)], label=role)
        a.set(xlabel=RESID, ylabel="log p(first token of the class name)", title="Logit lens")
        b.set(xlabel=RESID, ylabel="median rank in the vocabulary (1 = top)", yscale="log", title="Rank of the class")
        for ax in (a, b):
            ax.legend(fontsize=8)
            ax.xaxis.get_major_locator().set_params(integer=True)
        return [save(fig, store, "logit_lens")]
