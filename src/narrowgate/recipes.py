"""The paper's fine-tuning recipes and the check of every fine-tuning setting, before anything loads.

`check` is what ``narrowgate finetune`` and `narrowgate.finetune.finetune` both call first: every
number is a whole number of at least 1 (``--steps 0`` is not "a full epoch", ``--lr inf`` is not a
learning rate), every source is one narrowgate reads, and the mixture is exactly what will be trained
on: a recipe source missing from ``--data`` is refused unless ``--samples SOURCE=0`` leaves it out on
purpose (or the run is on the synthetic stand-in alone, which needs no files). It raises `OptionError` naming the option and the fix. Nothing here imports torch, so the command
line answers a bad option at once.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace

from .errors import OptionError
from .parsing import check_count

SOURCES = ("llava-instruct", "vqav2", "coco", "synthetic")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters and data mixture (examples per source) of one fine-tuning recipe."""

    rank: int
    alpha: int
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int = 1
    mixture: dict = field(default_factory=dict)
    knockouts: tuple[str, ...] = ()


RECIPES = {
    "understanding": Recipe(
        rank=64,
        alpha=16,
        lr=5e-5,
        weight_decay=0.0,
        batch_size=64,
        mixture={"vqav2": 18750, "coco": 18750, "llava-instruct": 150000},
    ),
    "remove-gate": Recipe(
        rank=128,
        alpha=256,
        lr=2e-5,
        weight_decay=0.1,
        batch_size=128,
        mixture={"llava-instruct": 7500, "vqav2": 7500},
        knockouts=("eoi->text",),
    ),
}


def _whole(value, option: str, least: int = 1) -> None:
    if least == 1:
        check_count(value, option)
    elif isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise OptionError(f"{option} must be a whole number of at least {least}, got {value!r}.")


def parse_samples(items) -> dict[str, int]:
    """``["vqav2=100", ...]`` (the command line's ``--samples``) -> {source: n}; refuses what is not SOURCE=N."""
    out: dict[str, int] = {}
    for item in items or ():
        key, eq, value = str(item).partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise OptionError(f"--samples {item!r}: write SOURCE=N, e.g. --samples vqav2=7500.")
        if not value.isdigit():
            raise OptionError(f"--samples {item!r}: N must be a whole number (0 leaves a recipe source out).")
        if key in out:
            raise OptionError(f"--samples names {key!r} twice.")
        out[key] = int(value)
    return out


def parse_data(items) -> dict[str, str | None]:
    """``["vqav2=DIR", "synthetic"]`` (the command line's ``--data``) -> {source: path or None}."""
    out: dict[str, str | None] = {}
    for item in items or ():
        key, _, value = str(item).partition("=")
        key = key.strip()
        if key in out:
            raise OptionError(f"--data names {key!r} twice.")
        out[key] = value.strip() or None
    return out


def check(  # noqa: C901  # one refusal per setting of a recipe, each naming its fix
    recipe: str,
    data: dict[str, str | None],
    *,
    samples: dict[str, int] | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    micro_batch: int = 4,
    lr: float | None = None,
    heldout: int = 64,
    seed: int = 42,
    save_every: int = 50,
    dtype: str = "auto",
    vqa_prompt: str | None = None,
) -> tuple[Recipe, dict[str, int]]:
    """The recipe with the overrides applied, and the mixture (source -> training examples); or `OptionError`."""
    if recipe not in RECIPES:
        raise OptionError(f"--recipe {recipe!r} is not a recipe; choose one of {', '.join(RECIPES)}.")
    for value, option in ((steps, "--steps"), (batch_size, "--batch-size")):
        if value is not None:
            _whole(value, option)
    _whole(micro_batch, "--micro-batch")
    _whole(heldout, "--heldout")
    _whole(save_every, "--save-every")
    _whole(seed, "--seed", least=0)
    if lr is not None and (
        isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0
    ):
        raise OptionError(f"--lr must be a finite number above 0, got {lr!r}.")
    if dtype not in DTYPES:
        raise OptionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    if vqa_prompt is not None and "{question}" not in vqa_prompt:
        raise OptionError(f"--vqa-prompt {vqa_prompt!r} has no {{question}} placeholder for the question.")
    if not data:
        raise OptionError("Give at least one --data SOURCE=PATH (or --data synthetic).")
    for source, path in data.items():
        if source not in SOURCES:
            raise OptionError(f"--data {source!r} is not a source; choose from {', '.join(SOURCES)}.")
        if source == "synthetic" and path is not None:
            raise OptionError(f"--data synthetic={path} : synthetic data needs no path; write --data synthetic.")
        if source != "synthetic" and path is None:
            raise OptionError(f"--data {source} needs a path: --data {source}=DIR.")
    rec = RECIPES[recipe]
    samples = dict(samples or {})
    for source, n in samples.items():
        if source not in SOURCES:
            raise OptionError(f"--samples {source}={n}: {source!r} is not a source; choose from {', '.join(SOURCES)}.")
        _whole(n, f"--samples {source}", least=0)
        if source not in data and n > 0:
            raise OptionError(f"--samples {source}={n} but no --data {source}: give --data {source}=PATH too.")
        if source in data and n == 0:
            raise OptionError(f"--samples {source}=0 leaves out a source given with --data {source}: drop one.")
    sizes = {s: samples.get(s) or rec.mixture.get(s) for s in data}
    unsized = [s for s, n in sizes.items() if not n]
    if unsized:
        raise OptionError(f"The {recipe} recipe has no size for {', '.join(unsized)}; give --samples {unsized[0]}=N.")
    missing = [s for s in rec.mixture if s not in data and s not in samples]
    if missing and set(data) != {"synthetic"}:
        listed = ", ".join(f"{s} ({rec.mixture[s]})" for s in missing)
        raise OptionError(
            f"The {recipe} recipe trains on {listed} too, and no --data names it: give --data "
            f"{missing[0]}=PATH, or train without it with --samples {missing[0]}=0 (the card records it)."
        )
    return replace(rec, batch_size=batch_size or rec.batch_size, lr=lr or rec.lr), {s: n for s, n in sizes.items() if n}
