"""What an experiment is: the base class every experiment of `narrowgate.analyses` derives from.

An experiment is one file: its settings (a dataclass, `options`), how it turns examples into work
*units* (one example, or a pair for patching), how it processes a batch of units into per-unit
records, how it aggregates all records into tables, and its figures; its entry point (group
``narrowgate.experiments``, `narrowgate.catalog`) makes it a ``narrowgate run`` command. Everything else (the run directory, resuming, failures, progress,
out-of-memory back-off, the report) is the runner's, `narrowgate.runner.run`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..data import tasks
from ..deprecation import moved
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


#: Every experiment class decorated `register` in this process, by name.
REGISTRY: dict[str, type[Experiment]] = {}


def register(cls: type[Experiment]) -> type[Experiment]:
    """Class decorator: record ``cls`` in `REGISTRY` by its name, refusing a second class of that name.

    The in-process registry (an experiment defined in a notebook, looked up by name). It does not make a command:
    ``narrowgate run`` and `narrowgate.analyses.EXPERIMENTS` find experiments by their ``narrowgate.experiments``
    entry points alone (`narrowgate.catalog`), narrowgate's own as any other package's."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"Two experiments are named {cls.name!r}.")
    REGISTRY[cls.name] = cls
    return cls


#: The task each paper dataset implies (for experiments that run any of several tasks).
TASK_OF = {"vqav2": "vqa", "coco": "captions", "flickr30k": "captions", "imagenet": "classes"}


class Experiment:
    """Base class: subclasses set ``name``, ``task``, ``config`` and implement `process`/`aggregate`/`figures`."""

    name: str = ""
    task: str = ""
    #: The settings dataclass (its defaults are the paper's and the authors' values).
    config: type = options.RunConfig
    #: ``config``'s defaults that are values, set for each subclass.
    defaults: dict = {}
    #: Kinds of prompt the experiment uses (`prompts.KEYS`); the run resolves them per family into its config.
    prompts: tuple = ()
    #: For ``narrowgate compare``: (table, y column, grouping column or None) drawn on relative depth.
    curve: tuple | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.defaults = options.defaults(cls.config)

    def figures(self, tables: dict[str, pd.DataFrame], info: dict, store: RunStore) -> list[str]:
        """Draw the run's figures from its tables (`narrowgate.plots.save` each); returns their names. ``info``
        describes the model (`model_info`) and holds the run's settings under ``settings``."""
        return []

    def compare(self, runs: list[tuple[str, dict, dict]]) -> Figure | None:
        """One figure overlaying runs (label, tables, manifest) of this experiment, or None (`curve`)."""
        if self.curve is None:
            return None
        from ..plots import overlay_curves

        table, col, group = self.curve
        return overlay_curves(runs, table, col, group, self.name)

    def prompt_kinds(self, cfg: dict) -> tuple:
        """The kinds of prompt a run with ``cfg`` uses (default: `prompts`)."""
        return self.prompts

    def task_of(self, cfg: dict) -> str:
        """For experiments with a ``--task`` setting: that task, else the one the dataset implies, else ``task``."""
        return cfg.get("task") or TASK_OF.get(cfg["data"], self.task)

    def generates(self, cfg: dict) -> bool:
        """Whether the run generates VQA answers or captions (the authors' scripts for those kept the processor's
        image sizing, `prompts.IMAGE_SIZES`)."""
        task = self.task_of(cfg) if "task" in options.names(self.config) else self.task
        return task in ("vqa", "captions")

    def requested(self, cfg: dict) -> dict:
        """The sample size asked for: ``n`` examples and/or ``n_per_class`` images per class."""
        return {k: cfg.get(k) for k in ("n", "n_per_class") if cfg.get(k) is not None}

    def examples(self, cfg: dict) -> list:
        """The run's sample of examples (`tasks.load`), as ``cfg`` asks."""
        return tasks.load(
            cfg["data"],
            self.task,
            cfg.get("data_dir"),
            seed=cfg["seed"],
            allow_fewer=bool(cfg.get("allow_fewer")),
            **self.requested(cfg),
        )

    def units(self, examples: Iterable[Example], cfg: dict) -> Iterable[Unit]:
        """One unit per example; a list for a list of examples, a stream for a stream."""
        units = (Unit(e.id, (e,)) for e in examples)
        return list(units) if isinstance(examples, list) else units

    def check(self, examples: Iterable[Example], cfg: dict) -> None:
        """Refuse settings the data cannot support, before the model loads (default: nothing to check)."""

    def check_model(self, cfg: dict, n_layers: int) -> None:
        """Refuse settings the model cannot support, before anything is written (default: nothing to check)."""

    def process(self, vlm: VLM, units: list[Unit], images: list[tuple], cfg: dict) -> tuple[list[dict], dict]:
        """Records (one dict per unit, or more, each with ``example_id``) and aligned arrays."""
        raise NotImplementedError

    def aggregate(self, records: Shard, cfg: dict, info: dict) -> dict[str, pd.DataFrame]:
        """The run's tables from every record (``records.rows``) and array (``records.arrays``)."""
        raise NotImplementedError


def stack(arrays: dict, name: str) -> np.ndarray:
    """An array of the records as float32 (records are stored compactly)."""
    return np.asarray(arrays[name], dtype=np.float32)
