"""Gate scan: through which positions does the image reach the text? Every image-side position, causally.

For each example and every image-side position p — BOI, each image token, each in-image special such
as [EOL], and [EOI] — the condition "p -> text" is knocked out at every layer (``--mode``, ``mask`` by
default: exactly blind). Its *damage* is KL(baseline || knocked out) of the next-token distribution at
``last``. In the same run: the whole image side knocked out, and the whole image side *except* p, for
every p (what p alone carries). The single-position and whole-image knockouts run in the other mode too
(``zero``, the paper's, beside ``mask``). All conditions of an example share its image prefix and run as
batch rows of suffix passes, as many per pass as the memory budget holds (`VLM.forward_knockouts`; sparse
sources, each pass's logits reduced to KL at once).

The verdict rule, stated once in ``docs/gate-scan.md``:

- **Necessity** (the gate index) of a position = its mean damage / the mean whole-image damage;
  **sufficiency** = 1 - mean damage with everything but it knocked out / mean whole-image damage.
- The top position is chosen on one half of the examples and scored on the other (both ways, averaged);
  the 95% interval resamples both halves (the choice redone each time). Fewer than `MIN_EXAMPLES`
  scanned exactly, or a whole-image damage below ``--floor``: no index and no verdict.
- Narrow gate: necessity and sufficiency both at least 0.5 (interval lower ends); redundant gate:
  sufficient, not necessary; distributed: necessity below 0.2 and sufficiency below 0.5; and so on.
- **positions_for_90**: per example, the smallest number of its top-ranked positions that, knocked out
  *together* (measured, not summed), do at least 90% of the whole-image damage (a geometric grid of set
  sizes, then bisection); the median over examples. Reported, not part of the verdict.
- Layer resolution: each example's top positions (``--top``) and the whole image side knocked out in
  ``--windows`` consecutive layer windows only.
- ``--method attribution``: a first-order estimate of every position's effect from one forward and one
  backward (`VLM.attribute`): the predicted change of the log-probability of the model's own next token,
  its size taken as the damage (KL itself has zero gradient at the baseline). The exact scan runs on the
  first ``--check`` examples, which give the gate numbers and the Spearman rank correlation of the
  estimate with the exact KL damage (``spearman``) and with the exact log-probability change
  (``spearman_logp``, the quantity estimated).
- ``--images N``: each prompt shows N consecutive examples' images (and the first one's prompt); the scan
  covers every image's side (``boi@n``, ``image@n[k]``, ``eol@n[i]``, ``eoi@n``, ``between@n[i]``) and
  ``gate_by_image`` sums it up per image: the image knocked out whole, its share of the whole side's damage, and
  the split-half necessity and sufficiency of its top position measured within it (the rest of the image knocked
  out for sufficiency). ``--frames T``: the T images as the frames of one clip (a video, on models that take
  one); positions ``frame@t[k]``, and ``gate_by_frame`` per frame.
- ``--score`` (VQA and captions): every condition also generates its answer / caption, and each position
  gets the task-score drop of its knockout (VQA accuracy per example, averaged; CIDEr-D over the
  examples that have the position) beside its KL damage; `gate` adds the baseline, whole-image and
  top-position scores. It costs one generation per position and example.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import torch

from ..data import VQAExample
from ..data.prompts import NEW_TOKENS, caption_prompt, class_prompt, vqa_prompt
from ..deprecation import moved
from ..engine.state import InterventionError
from ..errors import OptionError
from ..metrics import scores
from ..roles import image_side
from ..video import Video
from .base import Experiment, Sample, Unit, register
from .options import MODES, ClassPrompt, RunConfig, TaskPrompts, option

if TYPE_CHECKING:
    from PIL import Image

    from ..batch import Batch
    from ..data.base import Example
    from ..engine.shared import SharedPrefix
    from ..families.base import ImageLayout
    from ..store import RunStore, Shard
    from ..vlm import VLM

#: Names that lived here until 0.2 and their new homes (still importable from here, with a warning, until 0.4.0).
__getattr__ = moved(__name__, "0.3.0", "0.4.0", kl="narrowgate.metrics.scores", spearman="narrowgate.metrics.scores")

GRID_GROWTH = 1.5
FILL = 64  # set sizes between two grid sizes measured in one pass when at most this many, else bisection
MIN_DAMAGE = 1e-6  # nats: below this the text does not read the image, and no share of it means anything
#: Booleans of knockout masks per call where they must be dense (everything but one position, for every position).
CHUNK_MASKS = 1 << 24
#: Examples scanned exactly that a split-half interval needs (half of them on each side).
MIN_EXAMPLES = 10
#: The verdict's thresholds on necessity (the gate index) and sufficiency (docs/gate-scan.md).
GATE, DISTRIBUTED = 0.5, 0.2
OTHER_MODE = {"mask": "zero", "zero": "mask"}
#: Sets of positions knocked out together, as indices into an example's image side.
Sets = Sequence[Sequence[int] | range | np.ndarray]


def side_positions(lay: ImageLayout, n: int | None = None) -> list[tuple[int, str, str]]:
    """Every image-side position of one layout: (absolute position, its role name, its role group), in order.
    ``n``: the image's number in a prompt holding several (names carry it: ``eoi@2``)."""
    boi = "boi" if n is None else f"boi@{n}"
    return ([] if lay.boi is None else [(lay.boi, boi, "boi")]) + image_side(lay, n)


def scan_positions(batch: Batch, b: int = 0) -> tuple[list[tuple[int, str, str]], dict[int, list[int]], str | None]:
    """Example ``b``'s image side, every image of it, and how it groups for the per-image summary.

    Returns the positions ((position, name, role group) in order: each image's boi, span and eoi, then the
    positions ``between`` it and the next image), the groups (image number -> indices into the positions; for a
    lone video, frame number -> its content tokens) and what a group is (``image``, ``frame``, or None for one
    still image)."""
    visuals = batch.visuals(b)
    if len(visuals) == 1:
        lay = visuals[0]
        side = side_positions(lay)
        frames = {p: t for t, f in enumerate(lay.frames, 1) for p in f}
        groups: dict[int, list[int]] = {}
        for i, (p, _, _) in enumerate(side):
            if p in frames:
                groups.setdefault(frames[p], []).append(i)
        return side, groups, ("frame" if groups else None)
    side, groups = [], {}
    for n, lay in enumerate(visuals, 1):
        mine = side_positions(lay, n)
        mine += [(p, f"between@{n}[{i}]", "between") for i, p in enumerate(batch.positions(f"between@{n}")[b].tolist())]
        groups[n] = list(range(len(side), len(side) + len(mine)))
        side += mine
    return side, groups, "image"


def grid(lay: ImageLayout, n: int | None = None) -> dict[str, tuple[int, int]]:
    """Where each image token sits on the image: rows split at [EOL]s, else a square grid, else one row. In a video,
    each frame's tokens on the frame's grid. ``n``: the image's number, as in `side_positions`."""
    at = "" if n is None else f"@{n}"
    if lay.frames and n is None:
        out: dict[str, tuple[int, int]] = {}
        for t, frame in enumerate(lay.frames, 1):
            out |= {f"frame@{t}[{k}]": cell for k, cell in enumerate(_square(len(frame)))}
        return out
    if lay.eol:
        out, row, col, breaks = {}, 0, 0, set(lay.eol)
        for p in range(lay.start, lay.end + 1):
            if p in breaks:
                row, col = row + 1, 0
            elif p in lay.content:
                out[f"image{at}[{lay.content.index(p)}]"] = (row, col)
                col += 1
        return out
    return {f"image{at}[{k}]": cell for k, cell in enumerate(_square(len(lay.content)))}


def _square(n: int) -> list[tuple[int, int]]:
    side = math.isqrt(n)
    cols = side if side * side == n else n
    return [(k // cols, k % cols) for k in range(n)]


def _per_prompt(cfg: GateScanConfig) -> int:
    """Examples per prompt: ``--images`` or ``--frames`` (1: one image)."""
    return max(int(cfg.images or 1), int(cfg.frames or 1))


def _visual(images: tuple[Image.Image, ...], cfg: GateScanConfig) -> Image.Image | list[Image.Image] | Video:
    """What one prompt shows of a unit's images: the image, the list of them, or a clip of them (``--frames``) at
    the first one's size."""
    if int(cfg.frames or 1) > 1:
        size = images[0].size
        return Video([im.convert("RGB").resize(size) for im in images])
    return images[0] if len(images) == 1 else list(images)


def sources(sets: list[Any], length: int) -> torch.Tensor:
    """Knockout sources [C, 1, T] from C sets of positions, sparse: a scan over thousands of positions holds their
    entries only, not C x T booleans (`VLM.forward_knockouts` makes each pass's masks)."""
    index = [(c, 0, p) for c, s in enumerate(sets) for p in s]
    at = torch.tensor(index, dtype=torch.long).T if index else torch.zeros(3, 0, dtype=torch.long)
    values = torch.ones(at.shape[1], dtype=torch.bool)
    return torch.sparse_coo_tensor(at, values, (len(sets), 1, length), check_invariants=True).coalesce()


def windows(n_layers: int, count: int) -> list[tuple[int, ...]]:
    """``count`` consecutive decoder-layer windows covering 0..n_layers-1."""
    edges = np.linspace(0, n_layers, min(count, n_layers) + 1).round().astype(int)
    return [tuple(range(a, b)) for a, b in zip(edges[:-1], edges[1:])]


@dataclass
class GateScanConfig(ClassPrompt, TaskPrompts, RunConfig):
    """Settings of ``narrowgate run gate-scan``."""

    mode: str = option("mask", "Knockout mode: mask (exactly blind) or zero (the paper's).", choices=MODES)
    method: str = option(
        "exact", "exact, or attribution (first-order, one forward + backward).", choices=("exact", "attribution")
    )
    check: int = option(
        20,
        f"With --method attribution: examples also scanned exactly (gate numbers, rank correlation; at least {MIN_EXAMPLES}).",
        min=1,
    )
    top: int = option(3, "Top positions per example resolved over layer windows.", min=1)
    windows: int = option(4, "Number of consecutive layer windows.", min=1)
    bootstrap: int = option(1000, "Bootstrap resamples of the intervals.", min=1)
    floor: float = option(
        0.01,
        "Whole-image damage (nats) below which no verdict is given: the text barely reads the image.",
        parse="finite",
        min=0.0,
    )
    per_example: bool = option(False, "Also write tables/positions_by_example.")
    images: int = option(
        1,
        "Images per prompt: each prompt shows this many consecutive examples' images and the first one's prompt; "
        "the scan covers every image's positions, summarised per image (table gate_by_image).",
        min=1,
    )
    frames: int = option(
        1,
        "Frames per clip: each prompt shows a video of this many consecutive examples' images (at the first one's "
        "size) and the first one's prompt, summarised per frame (table gate_by_frame); models that take video.",
        min=1,
    )
    score: bool = option(
        False, "On VQA/captions: also the task-score drop of every position (one generation per position and example)."
    )


@register
class GateScan(Experiment[GateScanConfig]):
    """Through which positions does the image reach the text? Every image-side position, causally."""

    name = "gate-scan"
    task = "classes"
    config = GateScanConfig

    def prompt_kinds(self, cfg: GateScanConfig) -> tuple[str, ...]:
        """The one prompt of the run's task (``class`` for classes)."""
        return ({"classes": "class"}.get(self.task_of(cfg), self.task_of(cfg)),)

    def requested(self, cfg: GateScanConfig) -> dict[str, int]:
        """``n`` examples (200 on VQA/captions), or ``n_per_class`` images per class (10) on classes."""
        if self.task_of(cfg) == "classes":
            out = {"n_per_class": cfg.n_per_class or 10}
            return {**out, "n": cfg.n} if cfg.n else out
        return {"n": cfg.n or 200}

    def check(self, examples: Sample, cfg: GateScanConfig) -> None:
        """Refuse a sample too small for the split-half interval, a floor that is no number of nats, and several
        images per prompt together with frames."""
        if int(cfg.images or 1) > 1 and int(cfg.frames or 1) > 1:
            raise OptionError(
                "gate-scan takes --images or --frames, not both: a prompt shows several images or one clip."
            )
        floor = cfg.floor
        if not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor >= 0):
            raise OptionError(f"--floor must be a finite number of nats of at least 0, got {floor!r}.")
        per = _per_prompt(cfg)
        exact = len(examples) // per
        if cfg.method == "attribution":
            exact = min(exact, int(cfg.check))
            if exact < MIN_EXAMPLES:
                raise OptionError(
                    f"gate-scan --method attribution scans {exact} example(s) exactly (--check {cfg.check}, "
                    f"{len(examples)} example(s)); its split-half interval needs at least {MIN_EXAMPLES}: raise --check "
                    "(and the sample)."
                )
        if exact < MIN_EXAMPLES:
            what = "--n-per-class / --n" if self.task_of(cfg) == "classes" else "--n"
            of = f" ({len(examples)} examples, {per} per prompt)" if per > 1 else ""
            raise OptionError(
                f"gate-scan on {exact} prompt(s){of} gives no interval: the top position is chosen on one half of the "
                f"prompts and scored on the other, which needs at least {MIN_EXAMPLES} ({MIN_EXAMPLES // 2} per "
                f"half). Raise {what}."
            )
        if cfg.score and self.task_of(cfg) == "vqa":
            from ..data import tasks

            tasks.require_answers(examples, cfg.data_dir)

    def units(self, examples: Sample, cfg: GateScanConfig) -> list[Unit]:
        """One unit per prompt: ``--images`` / ``--frames`` consecutive examples (one by default); the first
        ``--check`` are scanned exactly under ``--method attribution``. Refuses ``--score`` on classes."""
        if cfg.score and self.task_of(cfg) not in ("vqa", "captions"):
            raise OptionError(
                f"--score needs a generative task, and this run's is {self.task_of(cfg)!r}: give --data "
                "vqav2, coco or flickr30k, or --task vqa / captions with synthetic data."
            )
        per = _per_prompt(cfg)
        stream, groups = iter(examples), []  # examples may be a Stream, made one at a time
        while len(group := tuple(itertools.islice(stream, per))) == per:
            groups.append(group)
        return [Unit("+".join(e.id for e in g), g, meta={"check": i < int(cfg.check)}) for i, g in enumerate(groups)]

    def _prompt(self, example: Example, cfg: GateScanConfig) -> str:
        task = self.task_of(cfg)
        if task == "vqa":
            return vqa_prompt(cfg.vqa_prompt, cast(VQAExample, example).question)
        return caption_prompt(cfg.caption_prompt) if task == "captions" else class_prompt(cfg.prompt, cfg.data)

    def process(
        self, vlm: VLM, units: list[Unit], images: list[tuple], cfg: GateScanConfig
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per prompt, every image-side position's damage (`_exact`; or its first-order estimate), and with
        ``--score`` the text generated under each knockout."""
        rows = []
        for unit, imgs in zip(units, images):
            batch = vlm.prepare([_visual(imgs, cfg)], [self._prompt(unit.examples[0], cfg)])
            last = batch.visuals(0)[-1]
            if last.eoi is None:
                raise InterventionError("The gate scan needs text after the image; this prompt ends with the image.")
            side, groups, kind = scan_positions(batch)
            prefix = vlm.share_prefix(batch, last.eoi + 1)
            visuals = batch.visuals(0)
            cells: dict = {}
            for n, lay in enumerate(visuals, 1):
                cells |= grid(lay, n if len(visuals) > 1 else None)
            row = {
                "example_id": unit.id,
                "asked": unit.examples[0].id,
                "positions": [n for _, n, _ in side],
                "roles": [r for _, _, r in side],
                "grid": [list(cells.get(n, (-1, -1))) for _, n, _ in side],
            }
            if kind:
                label = {i: g for g, members in groups.items() for i in members}
                row.update(group_kind=kind, group=[label.get(i, 0) for i in range(len(side))])
            if cfg.method == "attribution":
                est, _ = vlm.attribute(prefix, mode=cfg.mode)
                row["estimate"] = est[0, [p for p, _, _ in side]].abs().tolist()
                if not unit.meta.get("check"):
                    rows.append(row)
                    continue
            row.update(self._exact(vlm, prefix, side, cfg, groups))
            if cfg.score:
                row["texts"] = self._texts(vlm, batch, side, cfg)
            if cfg.method == "attribution":
                row["spearman"] = scores.spearman(row["estimate"], row["damage"])
                row["spearman_logp"] = scores.spearman(row["estimate"], np.abs(row["logp_change"]))
            rows.append(row)
        return rows, {}

    def _texts(self, vlm: VLM, batch: Batch, side: list[tuple[int, str, str]], cfg: GateScanConfig) -> list[str]:
        """Generated text with no knockout, each position -> text, and the whole image side -> text."""
        pos = [p for p, _, _ in side]
        m = sources([[]] + [[p] for p in pos] + [pos], batch.length)
        new = int(cfg.max_new_tokens or NEW_TOKENS[self.task_of(cfg)])
        gens = vlm.generate_knockouts(batch, m, mode=cfg.mode, max_new_tokens=new)
        return [vlm.decode(g, batch)[0].strip() for g in gens]

    def _exact(
        self,
        vlm: VLM,
        prefix: SharedPrefix,
        side: list[tuple[int, str, str]],
        cfg: GateScanConfig,
        groups: dict[int, list[int]] | None = None,
    ) -> dict[str, Any]:
        """One example's single-position damages (both modes), the whole image side knocked out (both modes) and
        everything but each position knocked out, the 90% set size and the layer windows. With ``groups`` (image
        or frame number -> indices into ``side``), also each group knocked out whole and, per position of a group,
        the rest of its group."""
        T, N, mode = prefix.batch.length, len(side), cfg.mode
        pos = [p for p, _, _ in side]

        def masks(sets: Sets) -> torch.Tensor:
            return sources([[pos[int(j)] for j in s] for s in sets], T)

        def measured(
            sets: Sets,
            reduce: Callable[[torch.Tensor], torch.Tensor],
            layers: list[int | Sequence[int] | None] | None = None,
            mode: str = mode,
        ) -> torch.Tensor:  # reduced pass by pass: never C x V
            return vlm.forward_knockouts(
                prefix, masks(sets), layers=layers, mode=mode, reduce=lambda x: reduce(x[:, 0])
            )

        def damage(sets: Sets, layers: list[int | Sequence[int] | None] | None = None, mode: str = mode) -> np.ndarray:
            return measured(sets, lambda x: scores.kl(base, x), layers, mode).numpy()

        def all_but() -> np.ndarray:
            """KL with everything but each position knocked out: N x (N - 1) positions in all, so as dense masks
            made a chunk at a time (a list, or a sparse tensor, of them all would grow with N squared)."""
            side_mask = torch.zeros(T, dtype=torch.bool)
            side_mask[pos] = True
            at, step, out = torch.tensor(pos), max(1, CHUNK_MASKS // T), []
            for s in range(0, N, step):
                idx = torch.arange(s, min(N, s + step))
                m = side_mask.repeat(len(idx), 1)
                m[torch.arange(len(idx)), at[idx]] = False
                out.append(
                    vlm.forward_knockouts(prefix, m[:, None], mode=mode, reduce=lambda x: scores.kl(base, x[:, 0]))
                )
            return torch.cat(out).numpy()

        base = measured([[]], lambda x: x)[0]
        groups = groups or {}
        labels = sorted(groups)
        in_group = {i: g for g in labels for i in groups[g]}
        group_sets = [groups[g] for g in labels] + [[j for j in groups[in_group[i]] if j != i] for i in in_group]
        grouped = damage(group_sets) if group_sets else np.zeros(0)
        own = int(base.argmax())
        singles = [[i] for i in range(N)]
        both = measured(singles + [range(N)], lambda x: torch.stack([scores.kl(base, x), x.log_softmax(-1)[:, own]], 1))
        single, whole = both[:N, 0].numpy(), float(both[N, 0])
        logp_change = (both[:N, 1] - base.log_softmax(-1)[own]).tolist()
        rest = all_but()
        other = damage(singles + [range(N)], mode=OTHER_MODE[mode])  # separate passes: one mode per pass
        order = np.argsort(-single, kind="stable")
        grid_k = sorted({min(N, int(round(GRID_GROWTH**i))) for i in range(64)} | {N})
        grid_k = [k for k in grid_k if k <= N]
        joint = dict(zip(grid_k, damage([order[:k] for k in grid_k])))
        k90 = float("nan")
        if whole > MIN_DAMAGE:
            goal = 0.9 * whole
            hi = next((k for k in grid_k if joint[k] >= goal), N)
            lo = max([k for k in grid_k if k < hi], default=0)
            while hi - lo > 1:  # joint damage grows with the set: between two grid sizes, all at once or bisect
                if hi - lo - 1 <= FILL:
                    between = range(lo + 1, hi)
                    hi = min(
                        (k for k, v in zip(between, damage([order[:k] for k in between])) if v >= goal), default=hi
                    )
                    break
                mid = (lo + hi) // 2
                if damage([order[:mid]])[0] >= goal:
                    hi = mid
                else:
                    lo = mid
            k90 = float(hi)
        top = [int(i) for i in order[: int(cfg.top)]]
        spans = windows(vlm.n_layers, int(cfg.windows))
        sets = [[i] for i in top] + [range(N)]
        d_windows = damage(sets * len(spans), layers=[w for w in spans for _ in sets])
        by_window = d_windows.reshape(len(spans), len(sets)).tolist()
        out = {}
        if labels:
            but = dict(zip(in_group, grouped[len(labels) :]))
            out = {
                "group_labels": labels,
                "group_whole": grouped[: len(labels)].tolist(),
                "group_all_but": [float(but.get(i, np.nan)) for i in range(N)],
            }
        return out | {
            "damage": single.tolist(),
            "damage_other": other[:N].tolist(),
            "all_but": rest.tolist(),
            "logp_change": logp_change,
            "whole": whole,
            "whole_other": float(other[N]),
            "k90": k90,
            "window_top": [side[i][1] for i in top],
            "window_damage": by_window,
        }

    def aggregate(self, records: Shard, cfg: GateScanConfig, info: dict[str, Any]) -> dict[str, pd.DataFrame]:
        """Tables ``positions`` (per position: damage with its interval, sufficiency, score drop), ``gate`` (the
        split-half gate numbers and the verdict, `docs/gate-scan.md`), ``layers`` and the per-image summaries."""
        df = records.rows
        exact = df[df["damage"].notna()] if "damage" in df else df.iloc[:0]
        rng = np.random.default_rng(cfg.seed)
        tables = {}
        key = "estimate" if cfg.method == "attribution" else "damage"
        scored = df if key == "estimate" else exact
        names, table = _position_table(scored, key, rng, int(cfg.bootstrap))
        tables["positions"] = table
        if cfg.per_example:
            tables["positions_by_example"] = pd.DataFrame(
                [
                    {"example_id": r["example_id"], "position": n, key: float(v)}
                    for _, r in scored.iterrows()
                    for n, v in zip(r["positions"], r[key])
                ]
            )
        mode, other = cfg.mode, OTHER_MODE[cfg.mode]
        gate: dict[str, Any] = {
            "method": cfg.method,
            "mode": mode,
            "n": len(scored),
            "n_exact": len(exact),
            "top_position": names[0],
            "floor": float(cfg.floor),
        }
        if len(exact):
            D, Do, R = (_matrix(exact, k, names) for k in ("damage", "damage_other", "all_but"))
            W, Wo = (exact[k].to_numpy(dtype=float) for k in ("whole", "whole_other"))
            top = int(np.nanargmax(np.nanmean(D, 0)))
            whole = float(W.mean())
            table["sufficiency"] = 1 - np.nanmean(R, 0) / whole if whole > MIN_DAMAGE else np.nan
            table[f"damage_{other}"] = np.nanmean(Do, 0)
            gate.update(
                top_position=names[top],
                whole_damage=whole,
                **{f"whole_damage_{mode}": whole, f"whole_damage_{other}": float(Wo.mean())},
                whole_except_top_damage=float(np.nanmean(R[:, top])),
                positions_for_90=float(np.nanmedian(exact["k90"])) if exact["k90"].notna().any() else float("nan"),
            )
            gate.update(_split_half(D, W, R, Do, Wo, names, top, mode, other, rng, int(cfg.bootstrap)))
            tables["layers"] = _layer_table(exact, info["n_layers"], int(cfg.windows))
        if cfg.method == "attribution" and len(exact):
            gate["spearman"] = float(exact["spearman"].mean())
            gate["spearman_logp"] = float(exact["spearman_logp"].mean())
            gate["spearman_mean_profile"] = scores.spearman(
                np.nanmean(_matrix(exact, "estimate", names), 0), np.nanmean(_matrix(exact, "damage", names), 0)
            )
        if "group_whole" in exact and exact["group_whole"].notna().any():
            kind = exact["group_kind"].dropna().iloc[0]
            tables[f"gate_by_{kind}"] = _group_table(exact, names, kind, cfg, rng)
            tables["positions"][kind] = tables["positions"]["position"].map(_group_of(exact))
        if cfg.score and len(exact):
            drops, summary = self._score_drops(exact, names, cfg)
            tables["positions"]["score_drop"] = tables["positions"]["position"].map(drops)
            gate.update(summary, score_drop_top=float(drops[gate["top_position"]]))
        gate["verdict"] = verdict(gate)
        tables["gate"] = pd.DataFrame([gate])
        return tables

    def _score_drops(self, exact: pd.DataFrame, names: list[str], cfg: GateScanConfig) -> tuple[dict, dict]:
        """Per position, baseline score - score with that position knocked out (on the examples that have it)."""
        task = self.task_of(cfg)
        ids = (exact["asked"] if "asked" in exact else exact["example_id"]).tolist()  # the prompt's example
        wanted = set(ids)
        examples = {e.id: e for e in self.examples(cfg) if e.id in wanted}
        tokenize = cfg.cider_tokenize or "ptb"
        cache: dict[frozenset, float] = {}

        def score(preds: dict) -> float:
            return scores.text_score(task, preds, examples, tokenize)

        def base_score(ids_: frozenset) -> float:  # one baseline score per set of examples, not one per position
            if ids_ not in cache:
                cache[ids_] = score({i: base[i] for i in ids_})
            return cache[ids_]

        base = {i: r["texts"][0] for i, (_, r) in zip(ids, exact.iterrows())}
        whole = {i: r["texts"][-1] for i, (_, r) in zip(ids, exact.iterrows())}
        per_pos: dict[str, dict] = {n: {} for n in names}
        for i, (_, r) in zip(ids, exact.iterrows()):
            for n, text in zip(r["positions"], r["texts"][1:-1]):
                per_pos[n][i] = text
        drops = {n: base_score(frozenset(preds)) - score(preds) for n, preds in per_pos.items() if preds}
        b, w = base_score(frozenset(base)), score(whole)
        return drops, {
            "score_metric": scores.text_metric(task, tokenize),
            "score_baseline": b,
            "score_whole_image": w,
            "score_drop_whole": b - w,
        }

    def figures(
        self, tables: dict[str, pd.DataFrame], info: dict[str, Any], store: RunStore, cfg: GateScanConfig
    ) -> list[str]:
        """Per-position damage laid out on the image grid, the specials (BOI, [EOL]s, [EOI]) as bars beside it."""
        from ..plots import COLORS, has, plt, save

        if not has(tables, "positions"):
            return []
        df = tables["positions"]
        grid = df[df["row"] >= 0].copy()
        side_by_side = next((k for k in ("image", "frame") if k in grid), None)
        if side_by_side:  # several images (frames): each on its own grid, left to right
            cols, offset = grid["col"].astype(int), 0
            for g in sorted(grid[side_by_side].dropna().unique()):
                mine = grid[side_by_side] == g
                cols[mine] += offset
                offset = int(cols[mine].max()) + 2
            grid["col"] = cols
        specials = df[df["row"] < 0].sort_values("rank").head(16)
        label = (
            "estimated drop of log p(own next token)"
            if "attribution" in set(tables["gate"]["method"])
            else "damage: KL at last (nats)"
        )
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [1.2, 1]})
        if len(grid):
            cells = np.full((int(grid["row"].max()) + 1, int(grid["col"].max()) + 1), np.nan)
            cells[grid["row"].astype(int), grid["col"].astype(int)] = grid["damage"]
            im = a.imshow(cells, cmap="magma", aspect="auto" if cells.shape[0] == 1 else "equal")
            fig.colorbar(im, ax=a, fraction=0.046, label=label)
        where = f", {side_by_side}s left to right" if side_by_side else ""
        a.set(title=f"image tokens on the image grid{where}", xticks=[], yticks=[])
        gate = tables["gate"].iloc[0]
        b.barh(range(len(specials)), specials["damage"], color=COLORS[1])
        err = np.vstack([specials["damage"] - specials["damage_low"], specials["damage_high"] - specials["damage"]])
        b.errorbar(specials["damage"], range(len(specials)), xerr=np.clip(err, 0, None), fmt="none", ecolor="k", lw=0.8)
        b.set_yticks(range(len(specials)), specials["position"], fontsize=8)
        b.invert_yaxis()
        b.set(xlabel=label, title="special positions (95% bootstrap)")
        if "whole_damage" in gate and np.isfinite(gate.get("whole_damage", np.nan)):
            b.set_title(
                f"special positions (95% bootstrap)\nwhole image side knocked out: {gate['whole_damage']:.3g}",
                fontsize=10,
            )
        title = f"Gate scan — top: {gate['top_position']}"
        if "gate_index" in gate and np.isfinite(gate.get("gate_index", np.nan)):
            title += f", gate index {gate['gate_index']:.2f}"
        fig.suptitle(title)
        return [save(fig, store, "gate_scan")]


def _matrix(df: pd.DataFrame, key: str, names: list[str]) -> np.ndarray:
    """[examples, positions] of ``key``, NaN where an example lacks a position (image sizes differ)."""
    col = {n: j for j, n in enumerate(names)}
    out = np.full((len(df), len(names)), np.nan)
    for i, (_, r) in enumerate(df.iterrows()):
        for n, v in zip(r["positions"], r[key]):
            out[i, col[n]] = v
    return out


def _means(weights: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Weighted means over examples of each column of ``X`` [E, P] (NaN = absent), one row per weight vector."""
    present = ~np.isnan(X)
    count = weights @ present
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (weights @ np.nan_to_num(X)) / count, np.nan)


def _cross_fit(
    wa: np.ndarray, wb: np.ndarray, D: np.ndarray, W: np.ndarray, R: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Split-half necessity (and sufficiency, with ``R``) per resample: the top position chosen by mean damage
    on one half and scored on the other, both ways, averaged. ``wa``/``wb``: [S, E] example weights of the two
    halves. Returns necessity [S], sufficiency [S] or None, and the two choices [S] each."""
    ma, mb = _means(wa, D), _means(wb, D)
    pa = np.argmax(np.where(np.isnan(ma), -np.inf, ma), 1)
    pb = np.argmax(np.where(np.isnan(mb), -np.inf, mb), 1)
    wa_w, wb_w = (wa @ W) / wa.sum(1), (wb @ W) / wb.sum(1)
    rows = np.arange(len(wa))
    with np.errstate(invalid="ignore", divide="ignore"):
        ok_a, ok_b = wa_w > MIN_DAMAGE, wb_w > MIN_DAMAGE
        nec = (np.where(ok_b, mb[rows, pa] / wb_w, np.nan) + np.where(ok_a, ma[rows, pb] / wa_w, np.nan)) / 2
        suf = None
        if R is not None:
            ra, rb = _means(wa, R), _means(wb, R)
            suf = (
                (np.where(ok_b, 1 - rb[rows, pa] / wb_w, np.nan)) + np.where(ok_a, 1 - ra[rows, pb] / wa_w, np.nan)
            ) / 2
    return nec, suf, pa, pb


def _interval(values: np.ndarray) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    return (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))) if len(v) else (float("nan"),) * 2


def _split_half(
    D: np.ndarray,
    W: np.ndarray,
    R: np.ndarray,
    Do: np.ndarray | None,
    Wo: np.ndarray | None,
    names: list[str],
    top: int,
    mode: str,
    other: str,
    rng: np.random.Generator,
    n_boot: int,
) -> dict[str, Any]:
    """The gate numbers of ``docs/gate-scan.md``: split-half necessity in both modes (``mode`` only when ``Do`` is
    None) and sufficiency in ``mode``, each with its bootstrap interval over both halves, and how often the
    resampled choice is ``top``."""
    E = len(W)
    out: dict = {}
    nan = float("nan")
    if E < MIN_EXAMPLES:
        for m in ("", f"_{mode}", f"_{other}"):
            out.update({f"gate_index{m}": nan, f"gate_low{m}": nan, f"gate_high{m}": nan})
        out.update(sufficiency=nan, sufficiency_low=nan, sufficiency_high=nan, top_stability=nan)
        return out
    perm = rng.permutation(E)
    halves = perm[: E // 2], perm[E // 2 :]

    def weights(resample: bool) -> tuple[np.ndarray, np.ndarray]:
        out_ = []
        for half in halves:
            w = np.zeros((n_boot if resample else 1, E))
            if resample:
                w[:, half] = rng.multinomial(len(half), np.full(len(half), 1 / len(half)), size=n_boot)
            else:
                w[:, half] = 1.0
            out_.append(w)
        return out_[0], out_[1]

    point, boot = weights(False), weights(True)
    modes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {mode: (D, W, R)}
    if Do is not None and Wo is not None:
        modes[other] = (Do, Wo, None)
    for m, (Dm, Wm, Rm) in modes.items():
        nec, suf, _, _ = _cross_fit(*point, Dm, Wm, Rm)
        bnec, bsuf, pa, pb = _cross_fit(*boot, Dm, Wm, Rm)
        low, high = _interval(bnec)
        out.update({f"gate_index_{m}": float(nec[0]), f"gate_low_{m}": low, f"gate_high_{m}": high})
        if m == mode:
            out.update(gate_index=float(nec[0]), gate_low=low, gate_high=high)
            assert suf is not None and bsuf is not None  # the asked mode always has its restorations (R)
            s_low, s_high = _interval(bsuf)
            out.update(sufficiency=float(suf[0]), sufficiency_low=s_low, sufficiency_high=s_high)
            out["top_stability"] = float(np.mean(np.concatenate([pa, pb]) == top))
    return out


def _group_of(df: pd.DataFrame) -> dict[str, int]:
    """The image (or frame) number of each position name that belongs to one."""
    out: dict[str, int] = {}
    for _, r in df.iterrows():
        for n, g in zip(r["positions"], r["group"]):
            if g:
                out.setdefault(n, int(g))
    return out


def _group_table(
    exact: pd.DataFrame, names: list[str], kind: str, cfg: GateScanConfig, rng: np.random.Generator
) -> pd.DataFrame:
    """One row per image (or frame): the damage of knocking it out whole, its share of the whole image side's,
    and the gate numbers of its top position within it (split-half necessity and sufficiency, measured against
    the group knocked out whole, with the rest of the group knocked out for sufficiency) and their verdict."""
    group_of = _group_of(exact)
    D, GA = _matrix(exact, "damage", names), _matrix(exact, "group_all_but", names)
    whole = float(exact["whole"].to_numpy(dtype=float).mean())
    mode = cfg.mode
    rows = []
    for g in sorted(set(group_of.values())):
        cols = [j for j, n in enumerate(names) if group_of.get(n) == g]
        Wg = np.asarray(
            [dict(zip(r["group_labels"], r["group_whole"])).get(g, np.nan) for _, r in exact.iterrows()], dtype=float
        )
        have = ~np.isnan(Wg)
        Dg, Rg, Wg = D[have][:, cols], GA[have][:, cols], Wg[have]
        local = int(np.nanargmax(np.nanmean(Dg, 0)))
        row = {
            kind: g,
            "positions": len(cols),
            "n": int(have.sum()),
            "n_exact": int(have.sum()),
            "mode": mode,
            "floor": float(cfg.floor),
            "top_position": names[cols[local]],
            "whole_damage": float(Wg.mean()),
            "share_of_whole": float(Wg.mean()) / whole if whole > MIN_DAMAGE else float("nan"),
        }
        local_names = [names[c] for c in cols]
        row.update(
            _split_half(Dg, Wg, Rg, None, None, local_names, local, mode, OTHER_MODE[mode], rng, int(cfg.bootstrap))
        )
        row["verdict"] = verdict(row, f"{kind} {g} whole")
        rows.append(row)
    return pd.DataFrame(rows)


def _position_table(
    df: pd.DataFrame, key: str, rng: np.random.Generator, n_boot: int
) -> tuple[list[str], pd.DataFrame]:
    """One row per position, ranked by mean ``key``: role, grid cell, mean and its bootstrap interval."""
    first: dict = {}
    for _, r in df.iterrows():
        for n, role, g in zip(r["positions"], r["roles"], r["grid"]):
            first.setdefault(n, (role, g))
    names = list(first)
    D = _matrix(df, key, names)
    mean = np.nanmean(D, 0)
    weights = rng.multinomial(len(D), np.full(len(D), 1 / len(D)), size=n_boot)  # [R, E] resampling counts
    present = ~np.isnan(D)
    boot = (weights @ np.nan_to_num(D)) / np.maximum(weights @ present, 1)
    low, high = np.quantile(boot, 0.025, axis=0), np.quantile(boot, 0.975, axis=0)
    if len(D) < MIN_EXAMPLES:  # a bootstrap over a handful of examples is no 95% interval
        low, high = np.full_like(mean, np.nan), np.full_like(mean, np.nan)
    order = np.argsort(-mean, kind="stable")
    rows = [
        {
            "rank": rank + 1,
            "position": names[j],
            "role": first[names[j]][0],
            "damage": float(mean[j]),
            "damage_low": float(low[j]),
            "damage_high": float(high[j]),
            "row": first[names[j]][1][0],
            "col": first[names[j]][1][1],
            "n": int(present[:, j].sum()),
        }
        for rank, j in enumerate(order)
    ]
    return [names[j] for j in order], pd.DataFrame(rows)


def _layer_table(df: pd.DataFrame, n_layers: int, count: int) -> pd.DataFrame:
    """Mean damage per layer window of each example's top positions (by rank) and of the whole image side."""
    rows = []
    for w_i, w in enumerate(windows(n_layers, count)):
        label = f"{w[0]}-{w[-1]}" if len(w) > 1 else str(w[0])
        per = np.asarray([r["window_damage"][w_i] for _, r in df.iterrows()], dtype=float)  # [E, top + 1]
        for k in range(per.shape[1] - 1):
            names = pd.Series([r["window_top"][k] for _, r in df.iterrows()])
            rows.append(
                {
                    "window": label,
                    "first_layer": w[0],
                    "what": f"top {k + 1}",
                    "position": names.mode().iloc[0],
                    "share_of_examples": float((names == names.mode().iloc[0]).mean()),
                    "damage": float(per[:, k].mean()),
                }
            )
        rows.append(
            {
                "window": label,
                "first_layer": w[0],
                "what": "image side",
                "position": "all",
                "share_of_examples": 1.0,
                "damage": float(per[:, -1].mean()),
            }
        )
    return pd.DataFrame(rows)


def verdict(gate: dict[str, Any], whole: str = "the whole image side") -> str:
    """One sentence from the split-half necessity and sufficiency of the top position (``docs/gate-scan.md``);
    ``whole``: what the whole-side damage knocks out (an image or a frame, in the per-image summaries)."""
    if "gate_index" not in gate:
        return (
            f"top position by first-order estimate: {gate['top_position']} (no exact scan was run, so no gate index)."
        )
    n_exact = gate.get("n_exact", 0)
    if n_exact < MIN_EXAMPLES:
        return (
            f"no verdict: {n_exact} example(s) were scanned exactly, and the split-half interval needs at least "
            f"{MIN_EXAMPLES} ({MIN_EXAMPLES // 2} per half); scan more examples."
        )
    if not gate["whole_damage"] >= gate["floor"]:
        return (
            f"no verdict: knocking out {whole} changes the next-token distribution by "
            f"{gate['whole_damage']:.3g} nats, below the floor of {gate['floor']:g}: the text barely reads the image here."
        )
    n_lo, n_hi, s_lo, s_hi = (gate[k] for k in ("gate_low", "gate_high", "sufficiency_low", "sufficiency_high"))
    where = (
        f"at {gate['top_position']}: necessity {gate['gate_index']:.2f} [{n_lo:.2f}, {n_hi:.2f}], "
        f"sufficiency {gate['sufficiency']:.2f} [{s_lo:.2f}, {s_hi:.2f}] ({gate['mode']} mode, split-half)"
    )
    if "positions_for_90" in gate:
        where += f"; {gate['positions_for_90']:g} position(s) carry 90% of the image's effect"
    if n_lo >= GATE and s_lo >= GATE:
        return f"a narrow gate {where}."
    if n_hi < GATE and s_lo >= GATE:
        return f"a redundant gate (the top position alone carries the image, but other positions do too) {where}."
    if n_lo >= GATE and s_hi < GATE:
        return f"a necessary but insufficient position (the text needs it, but does not get the image through it alone) {where}."
    if n_hi < DISTRIBUTED and s_hi < GATE:
        return f"distributed communication {where}."
    if n_hi < GATE and s_hi < GATE:
        return f"partly concentrated {where}."
    return f"inconclusive at this sample size (an interval contains {GATE}) {where}; scan more examples."
