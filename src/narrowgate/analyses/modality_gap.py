"""Sec. 4.1: are image and text representations separated in the residual stream?

Each Flickr30k image goes with its five captions concatenated, once image-first and once
text-first. Per example the residual is read, at every layer, at a random text position of the
image-first prompt and at a random image position of the text-first prompt (seeded by the
example id). Per layer: the median and inter-quartile range of the cosine similarity of image
and text vectors of different examples, and the homogeneity of ADP clusters with respect to
modality. Rows are residual indices ``resid`` 0..L (0 = embeddings); ``--outputs-only`` keeps the
layer outputs 1..L only. The figure draws the paper's axis (layer l = resid l+1) unless ``--axis resid``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..data import caption_text
from ..engine.interventions import Capture
from ..engine.shared import Condition
from ..errors import DataError, OptionError
from ..metrics import cosine_gap_per_layer, modality_homogeneity
from ..metrics.clustering import min_points
from ..store import BFloat16
from .base import Experiment, Sample, Unit, register, stack
from .options import PaperAxis, RunConfig, option

if TYPE_CHECKING:
    from ..batch import Batch
    from ..store import RunStore, Shard
    from ..vlm import VLM


@dataclass
class ModalityGapConfig(PaperAxis, RunConfig):
    """Settings of ``narrowgate run modality-gap``."""

    n: int | None = option(
        10000, "Image-caption pairs (the authors: the first 10,000 rows of Flickr30k test).", short="-n", min=1
    )
    Z: float = option(1.2, "ADP clustering confidence Z, above 0.", flag="--z", parse="positive")
    min_cluster_size: int | None = option(None, "Drop ADP clusters smaller than this.", min=1)
    outputs_only: bool = option(False, "Layer outputs only (resid 1..L, the paper's x axis), not the embeddings.")


def _pick(batch: Batch, role: str, ids: list[str], seed: int, salt: str) -> list[int]:
    out = []
    for pos, i in zip(batch.positions(role), ids):
        if not len(pos):
            raise ValueError(f"Example {i} has no {role} positions to sample from.")
        out.append(int(pos[random.Random(f"{seed}:{salt}:{i}").randrange(len(pos))]))
    return out


@register
class ModalityGap(Experiment[ModalityGapConfig]):
    """The cosine gap and the ADP clusters of image and text residuals, per layer."""

    name = "modality-gap"
    task = "image_text"
    config = ModalityGapConfig
    curve = ("modality_gap", "median", None)

    def check(self, examples: Sample, cfg: ModalityGapConfig) -> None:
        """Refuse a sample too small for the ADP clustering of its image and text points, before the model loads."""
        if 2 * len(examples) < min_points():
            need = -(-min_points() // 2)
            raise OptionError(
                f"--n {len(examples)} gives {2 * len(examples)} points per layer (one image and one text vector per "
                f"pair), but the ADP clustering needs at least {min_points()}: give --n {need} or more."
            )

    def process(
        self, vlm: VLM, units: list[Unit], images: list[tuple], cfg: ModalityGapConfig
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per image-caption pair, the residual of one seeded text token (image first) and of one image token
        (text first) at every residual index."""
        ids = [u.id for u in units]
        texts = [caption_text(u.examples[0]) for u in units]
        imgs = [im[0] for im in images]
        first = vlm.prepare(imgs, texts, image_first=True)
        after = vlm.prepare(imgs, texts, image_first=False)
        text_pos = _pick(first, "text", ids, cfg.seed, "text")
        image_pos = _pick(after, "image_content", ids, cfg.seed, "image")
        layers = tuple(range(1 if cfg.outputs_only else 0, vlm.n_layers + 1))
        t = vlm.forward_conditions(first, [Condition("baseline")], capture=Capture((), layers, at={"text": text_pos}))[
            "baseline"
        ]
        i = vlm.forward_conditions(
            after, [Condition("baseline")], capture=Capture((), layers, at={"image": image_pos})
        )["baseline"]
        rows = [
            {"example_id": u.id, "text_position": tp, "image_position": ip}
            for u, tp, ip in zip(units, text_pos, image_pos)
        ]
        return rows, {
            "text": BFloat16(t.residuals["text"].numpy(), layers),
            "image": BFloat16(i.residuals["image"].numpy(), layers),
        }

    def aggregate(self, records: Shard, cfg: ModalityGapConfig, info: dict[str, Any]) -> dict[str, pd.DataFrame]:
        """Table ``modality_gap``: per residual index, the image-text cosine quartiles and the homogeneity of the
        ADP clusters with the modality."""
        text = stack(records.arrays, "text").transpose(1, 0, 2)  # [L+1, N, D]
        image = stack(records.arrays, "image").transpose(1, 0, 2)
        if text.shape[1] + image.shape[1] < min_points():
            raise DataError(
                f"Only {text.shape[1]} pairs were recorded (the others failed, see tables/failures.csv): the ADP "
                f"clustering needs {min_points()} points per layer. Fix the failures and rerun with --retry-failed."
            )
        gap = cosine_gap_per_layer(image, text)
        modality = np.array(["image"] * image.shape[1] + ["text"] * text.shape[1])
        hom = []
        for l in range(text.shape[0]):
            X = np.concatenate([image[l], text[l]])
            hom.append(modality_homogeneity(X, modality, Z=cfg.Z, min_cluster_size=cfg.min_cluster_size))
        gap["homogeneity"] = hom
        gap["layer"] += 1 if cfg.outputs_only else 0
        return {"modality_gap": gap.rename(columns={"layer": "resid"})}

    def figures(
        self, tables: dict[str, pd.DataFrame], info: dict[str, Any], store: RunStore, cfg: ModalityGapConfig
    ) -> list[str]:
        """The image-text cosine (median and quartiles) and the cluster homogeneity per layer."""
        from ..plots import COLORS, has, plt, resid_axis, save

        if not has(tables, "modality_gap"):
            return []
        df, x, label = resid_axis(tables["modality_gap"], cfg.axis)
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        a.plot(x, df["median"], "-o", color=COLORS[0], ms=3, label=info["family"])
        a.fill_between(x, df["q25"], df["q75"], color=COLORS[0], alpha=0.25)
        a.set(xlabel=label, ylabel="cosine similarity (image vs text)", title="Modality gap")
        b.plot(x, df["homogeneity"], "-o", color=COLORS[1], ms=3)
        b.set(
            xlabel=label, ylabel="homogeneity (ADP clusters vs modality)", ylim=(-0.02, 1.02), title="Modality clusters"
        )
        for ax in (a, b):
            ax.xaxis.get_major_locator().set_params(integer=True)
        return [save(fig, store, "modality_gap")]
