"""What an experiment is: the base class every experiment of `narrowgate.analyses` derives from.

An experiment is one file: its settings (a dataclass, `options`), how it turns examples into work
*units* (one example, or a pair for patching), how it processes a batch of units into per-unit
records, how it aggregates all records into tables, and its figures; its entry point (group
``narrowgate.experiments``, `narrowgate.catalog`) makes it a ``narrowgate run`` command. Everything else (the run directory, resuming, failures, progress,
out-of-memory back-off, the report) is the runner's, `narrowgate.runner.run`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import numpy as np
import pandas as pd

from ..data import by_label, tasks
from ..deprecation import moved
from ..errors import DataError
from . import options

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..data.base import Example
    from ..store import RunStore, Shard
    from ..vlm import VLM

#: Names that lived here until 0.2 and their new homes (still importable from here, with a warning, until 0.4.0).
__getattr__ = moved(
    __name__,
    "0.3.0",
    "0.4.0",
    run="narrowgate.runner",
    model_info="narrowgate.runner",
    default_out="narrowgate.runner",
    RUN_ONLY="narrowgate.runner",
    Ranks="narrowgate.distributed",
    check_k="narrowgate.metrics.overlap",
    overlap_k="narrowgate.metrics.overlap",
    check_sweep="narrowgate.analyses.options",
    sweep_step="narrowgate.analyses.options",
)


@dataclass(frozen=True)
class Unit:
    """One piece of work: an id and the examples it needs (one, or two for a patching pair)."""

    id: str
    examples: tuple
    meta: dict = field(default_factory=dict, compare=False, hash=False)


class Sample(Protocol):
    """A run's examples: sized and re-iterable, a list or a `narrowgate.data.Stream` (made one at a time)."""

    def __len__(self) -> int:
        """How many examples."""
        ...

    def __iter__(self) -> Iterator[Example]:
        """The examples, from the first, on every pass."""
        ...


#: Every experiment class decorated `register` in this process, by name.
REGISTRY: dict[str, type[Experiment[Any]]] = {}

_E = TypeVar("_E", bound="type[Experiment[Any]]")


def register(cls: _E) -> _E:
    """Class decorator: record ``cls`` in `REGISTRY` by its name, refusing a second class of that name.

    The in-process registry (an experiment defined in a notebook, looked up by name). It does not make a command:
    ``narrowgate run`` and `narrowgate.analyses.EXPERIMENTS` find experiments by their ``narrowgate.experiments``
    entry points alone (`narrowgate.plugins`), narrowgate's own as any other package's."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"Two experiments are named {cls.name!r}.")
    REGISTRY[cls.name] = cls
    return cls


#: The task each paper dataset implies (for experiments that run any of several tasks).
TASK_OF = {"vqav2": "vqa", "coco": "captions", "flickr30k": "captions", "imagenet": "classes"}

#: An experiment's settings type: `options.RunConfig` and the groups it mixes in.
C = TypeVar("C", bound=options.RunConfig)


class Experiment(ABC, Generic[C]):
    """Base class: subclasses set ``name``, ``task`` and ``config`` and implement `process` and `aggregate`.

    ``Experiment[MyConfig]`` with ``config = MyConfig``: every hook receives the run's one settings instance
    (``cfg: MyConfig``, defaults applied, prompts and image size resolved), so mypy checks each setting read.
    """

    name: str = ""
    task: str = ""
    #: The settings dataclass (its defaults are the paper's and the authors' values).
    config: type[C]
    #: ``config``'s defaults that are values, set for each subclass.
    defaults: dict[str, Any] = {}
    #: Kinds of prompt the experiment uses (`prompts.KEYS`); the run resolves them per family into its config.
    prompts: tuple[str, ...] = ()
    #: For ``narrowgate compare``: (table, y column, grouping column or None) drawn on relative depth.
    curve: tuple[str, str, str | None] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config" in vars(cls):
            cls.defaults = options.defaults(cls.config)

    def figures(self, tables: dict[str, pd.DataFrame], info: dict[str, Any], store: RunStore, cfg: C) -> list[str]:
        """Draw the run's figures from its tables (`narrowgate.plots.save` each); returns their names. ``info``
        describes the model (`narrowgate.runner.model_info`); ``cfg`` holds the run's settings."""
        return []

    def compare(self, runs: list[tuple[str, dict, dict]]) -> Figure | None:
        """One figure overlaying runs (label, tables, manifest) of this experiment, or None (`curve`)."""
        if self.curve is None:
            return None
        from ..plots import overlay_curves

        table, col, group = self.curve
        return overlay_curves(runs, table, col, group, self.name)

    def prompt_kinds(self, cfg: C) -> tuple[str, ...]:
        """The kinds of prompt a run with ``cfg`` uses (default: `prompts`)."""
        return self.prompts

    def task_of(self, cfg: C) -> str:
        """For experiments with a ``--task`` setting: that task, else the one the dataset implies, else ``task``."""
        given = cfg.task if isinstance(cfg, options.TaskPrompts) else None
        return given or TASK_OF.get(cfg.data, self.task)

    def generates(self, cfg: C) -> bool:
        """Whether the run generates VQA answers or captions (the authors' scripts for those kept the processor's
        image sizing, `prompts.IMAGE_SIZES`)."""
        task = self.task_of(cfg) if isinstance(cfg, options.TaskPrompts) else self.task
        return task in ("vqa", "captions")

    def requested(self, cfg: C) -> dict[str, int]:
        """The sample size asked for: ``n`` examples and/or ``n_per_class`` images per class."""
        out = {}
        if cfg.n is not None:
            out["n"] = cfg.n
        if cfg.n_per_class is not None:
            out["n_per_class"] = cfg.n_per_class
        return out

    def examples(self, cfg: C) -> Sample:
        """The run's sample of examples (`tasks.load`), as ``cfg`` asks: a list, or a stream (synthetic data)."""
        asked = self.requested(cfg)
        return tasks.load(
            cfg.data,
            self.task_of(cfg) if isinstance(cfg, options.TaskPrompts) else self.task,
            cfg.data_dir,
            seed=cfg.seed,
            n=asked.get("n"),
            n_per_class=asked.get("n_per_class"),
            allow_fewer=cfg.allow_fewer,
        )

    def units(self, examples: Sample, cfg: C) -> Iterable[Unit]:
        """One unit per example; a list for a list of examples, a stream for a stream."""
        units = (Unit(e.id, (e,)) for e in examples)
        return list(units) if isinstance(examples, list) else units

    def check(self, examples: Sample, cfg: C) -> None:
        """Refuse settings the data cannot support, before the model loads (default: nothing to check)."""

    def check_model(self, cfg: C, n_layers: int) -> None:
        """Refuse settings the model cannot support, before anything is written (default: nothing to check)."""

    @abstractmethod
    def process(
        self, vlm: VLM, units: list[Unit], images: list[tuple], cfg: C
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Records (one dict per unit, or more, each with ``example_id``) and aligned arrays."""

    @abstractmethod
    def aggregate(self, records: Shard, cfg: C, info: dict[str, Any]) -> dict[str, pd.DataFrame]:
        """The run's tables from every record (``records.rows``) and array (``records.arrays``)."""


class PairedExperiment(Experiment[C]):
    """Experiments on pairs of images of two classes (patching, steering): images per pair class, each pair
    patched base <- target as published (``direction="paper"``) or both ways."""

    task = "classes"
    prompts = ("class_patching",)

    def requested(self, cfg: C) -> dict[str, int]:
        """``n_per_class`` images per pair class; ``n`` is refused (pairs sample per class)."""
        if cfg.n is not None:
            raise DataError(f"{self.name} samples images per pair class: give --n-per-class (the paper: 100), not --n.")
        return {"n_per_class": int(cfg.n_per_class or 0)}

    def examples(self, cfg: C) -> Sample:
        """The images of every class of the paper's pairs (`tasks.class_pairs`)."""
        return tasks.load(
            cfg.data,
            self.task,
            cfg.data_dir,
            seed=cfg.seed,
            n_per_class=self.requested(cfg)["n_per_class"],
            classes="pairs",
            allow_fewer=cfg.allow_fewer,
        )

    def units(self, examples: Sample, cfg: C) -> list[Unit]:
        """The i-th image of a pair's base class with the i-th of its target class, per pair and direction."""
        groups = {k: sorted(v, key=lambda e: e.id) for k, v in by_label(examples).items()}
        order = pair_order(cfg.data)
        if isinstance(cfg, options.PairsConfig) and cfg.direction == "both":
            order += [(t, b) for b, t in order]
        units = []
        for base, target in order:
            missing = [c for c in (base, target) if not groups.get(c)]
            if missing:
                raise DataError(f"Class pair ({base}, {target}): no images of {', '.join(missing)} in the data.")
            for i, (eb, et) in enumerate(zip(groups[base], groups[target])):
                units.append(Unit(f"{base}<-{target}|{i:04d}", (eb, et)))
        return units


def pair_order(dataset: str) -> list[tuple[str, str]]:
    """(base, target) per printed pair, as the paper's patching runs it: the first class is the donor."""
    return [(b, a) for a, b in tasks.class_pairs(dataset)]


def stack(arrays: dict, name: str) -> np.ndarray:
    """An array of the records as float32 (records are stored compactly)."""
    return np.asarray(arrays[name], dtype=np.float32)
