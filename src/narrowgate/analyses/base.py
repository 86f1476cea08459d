"""What an experiment is, and the one runner that executes any of them resumably.

An experiment turns examples into work *units* (one example, or a pair for patching), processes
a batch of units into per-unit records, and aggregates all records into tables. The runner owns
everything else: the run directory, skipping units already done, loading images (a bad one is
recorded with its reason and skipped), progress, batch-size back-off on out-of-memory, tables,
figures and the report.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from ..data import BadExample
from ..progress import progress_bar
from ..store import RunStore
from . import prompts, tasks

logger = logging.getLogger("narrowgate.run")

#: Settings that may change between a run and its resumption without changing its results.
RUN_ONLY = ("batch_size", "device_map", "max_memory", "out", "progress")


@dataclass(frozen=True)
class Unit:
    """One piece of work: an id and the examples it needs (one, or two for a patching pair)."""

    id: str
    examples: tuple
    meta: dict = field(default_factory=dict, compare=False, hash=False)


class Experiment:
    """Base class: subclasses set ``name``, ``task``, ``defaults`` and implement `process`/`aggregate`."""

    name: str = ""
    task: str = ""
    #: Experiment-specific settings and their defaults (the paper's and the authors' values).
    defaults: dict = {}
    #: Kinds of prompt the experiment uses (`prompts.KEYS`); the run resolves them per family into its config.
    prompts: tuple = ()

    def prompt_kinds(self, cfg: dict) -> tuple:
        return self.prompts

    def requested(self, cfg: dict) -> dict:
        """The sample size asked for: ``n`` examples and/or ``n_per_class`` images per class."""
        return {k: cfg.get(k) for k in ("n", "n_per_class") if cfg.get(k) is not None}

    def examples(self, cfg: dict) -> list:
        return tasks.load(cfg["data"], self.task, cfg.get("data_dir"), seed=cfg["seed"],
                          allow_fewer=bool(cfg.get("allow_fewer")), **self.requested(cfg))

    def units(self, examples: list, cfg: dict) -> list[Unit]:
        return [Unit(e.id, (e,)) for e in examples]

    def process(self, vlm, units: list[Unit], images: list[tuple], cfg: dict) -> tuple[list[dict], dict]:
        """Records (one dict per unit, or more, each with ``example_id``) and aligned arrays."""
        raise NotImplementedError

    def aggregate(self, records, cfg: dict, info: dict) -> dict[str, pd.DataFrame]:
        raise NotImplementedError


def default_out(experiment: str, model: str) -> Path:
    stem = Path(str(model).rstrip("/")).name or "model"
    return Path("runs") / f"{experiment}-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def model_info(vlm) -> dict:
    cfg = vlm.model.config
    return {
        "family": vlm.family.name,
        "model_type": cfg.model_type,
        "n_layers": vlm.n_layers,
        "hidden_size": vlm.hidden_size,
        "name_or_path": getattr(cfg, "_name_or_path", ""),
        "revision": getattr(cfg, "_commit_hash", None),
        "dtype": str(vlm.model.dtype),
        "attn_implementation": vlm.attn_implementation,
    }


def _load_images(units: list[Unit], store: RunStore) -> tuple[list[Unit], list[tuple]]:
    good, images = [], []
    for unit in units:
        try:
            imgs = tuple(e.load_image() for e in unit.examples)
        except BadExample as bad:
            logger.warning("skipping %s: %s", unit.id, bad)
            store.fail(unit.id, f"{bad.example_id}: {bad.reason}")
            continue
        good.append(unit)
        images.append(imgs)
    return good, images


def _process(exp: Experiment, vlm, units, images, cfg, store: RunStore, batch_size: int) -> int:
    """Process ``units`` in batches; halve the batch on out-of-memory (down to 1) and retry."""
    i = 0
    while i < len(units):
        chunk, imgs = units[i : i + batch_size], images[i : i + batch_size]
        try:
            rows, arrays = exp.process(vlm, chunk, imgs, cfg)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            logger.warning("out of memory: retrying with batch size %d", batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        store.write(rows, arrays)
        i += len(chunk)
    return batch_size


@dataclass(frozen=True)
class Ranks:
    """This process's place among data-parallel workers (torchrun / accelerate launch), from the environment."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Ranks":
        import os

        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def init(self) -> None:
        """Join the process group (gloo on CPU, nccl on GPU) so ranks can wait for each other."""
        import torch.distributed as dist

        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
            if torch.cuda.is_available():
                torch.cuda.set_device(self.local_rank)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gpus(self, n_gpus: int, local_world: int) -> list[int]:
        """The GPUs of this rank's group when each model spans several: n_gpus // local_world each."""
        per = n_gpus // max(1, local_world)
        if per < 1:
            raise ValueError(f"{local_world} processes per node but only {n_gpus} GPUs.")
        return list(range(self.local_rank * per, (self.local_rank + 1) * per))

    def shard(self, units: list) -> list:
        """This rank's units: every ``world``-th of the full, ordered list (stable across resumes)."""
        return units[self.rank :: self.world]


def run(exp: Experiment, cfg: dict, *, vlm=None, command: list[str] | None = None) -> RunStore:
    """Run (or resume) ``exp`` with settings ``cfg``; returns the run directory's store.

    Under torchrun / accelerate launch each rank processes its shard of the units into its own
    shards of the shared run directory; rank 0 then aggregates everything and draws the figures.
    """
    from ..loading import load
    from ..plots import draw
    from ..report import write_report

    cfg = {**exp.defaults, **{k: v for k, v in cfg.items() if v is not None}}
    cfg.setdefault("seed", 42)
    cfg.setdefault("batch_size", 1)
    ranks = Ranks.from_env()
    ranks.init()
    if ranks.world > 1 and not cfg.get("out"):
        raise ValueError("With several processes, give --out: every rank must write to the same run directory.")
    out = Path(cfg.get("out") or default_out(exp.name, cfg["model"]))
    store = RunStore(out, rank=ranks.rank)
    if vlm is None:
        device_map, max_memory = cfg.get("device_map"), cfg.get("max_memory")
        if ranks.world > 1 and torch.cuda.is_available():
            import os

            group = ranks.gpus(torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            if device_map is None and len(group) == 1:
                device_map = f"cuda:{group[0]}"
            elif max_memory is None:  # spread this rank's model over its own GPUs only
                device_map = device_map or "auto"
                max_memory = {i: int(torch.cuda.mem_get_info(i)[0] * 0.9) for i in group}
                max_memory["cpu"] = "64GiB"
        vlm = load(cfg["model"], dtype=cfg.get("dtype", "auto"), device_map=device_map, max_memory=max_memory)
    info = model_info(vlm)
    cfg = prompts.resolve(cfg, exp.prompt_kinds(cfg), info["family"], info["n_layers"])
    examples = exp.examples(cfg)
    units = exp.units(examples, cfg)
    key_cfg = {k: v for k, v in sorted(cfg.items()) if k not in RUN_ONLY}
    store.open_manifest(
        {
            "experiment": exp.name,
            "config": key_cfg,
            "run": {k: cfg.get(k) for k in RUN_ONLY if k in cfg},
            "command": shlex.join(command if command is not None else sys.argv),
            "model": info,
            "data": {"dataset": cfg["data"], "data_dir": str(cfg.get("data_dir")), "seed": cfg["seed"],
                     "requested": exp.requested(cfg), "actual": sample_counts(examples, units)},
        }
    )
    ids = [u.id for u in units]
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"{exp.name}: work unit ids are not unique.")
    done = store.done_ids()
    units = ranks.shard(units)
    todo = [u for u in units if u.id not in done]
    batch_size = int(cfg["batch_size"])
    with progress_bar(disable=not cfg.get("progress", True)) as progress:
        label = f"{exp.name} ({info['family']})" + (f" rank {ranks.rank}/{ranks.world}" if ranks.world > 1 else "")
        task = progress.add_task(label, total=len(units), completed=len(units) - len(todo))
        step = max(batch_size, 1) * 4
        for s in range(0, len(todo), step):
            good, images = _load_images(todo[s : s + step], store)
            batch_size = _process(exp, vlm, good, images, cfg, store, batch_size)
            progress.update(task, advance=len(todo[s : s + step]))
    ranks.barrier()
    if ranks.rank == 0:
        finish(exp, store, cfg, info, draw, write_report)
    ranks.barrier()
    return store


def sample_counts(examples: list, units: list[Unit]) -> dict:
    """How many examples (and classes, and images per class) and work units a run has."""
    out = {"examples": len(examples), "units": len(units)}
    labels = [getattr(e, "label", None) for e in examples]
    if examples and all(lab is not None for lab in labels):
        per = {}
        for lab in labels:
            per[lab] = per.get(lab, 0) + 1
        out.update(classes=len(per), min_per_class=min(per.values()), max_per_class=max(per.values()))
    return out


def finish(exp: Experiment, store: RunStore, cfg: dict, info: dict, draw, write_report) -> None:
    """Aggregate every record into tables, then figures and the report."""
    records = store.records()
    tables = exp.aggregate(records, cfg, info) if len(records.rows) else {}
    failures = store.failures()
    tables["failures"] = failures
    for name, df in tables.items():
        store.write_table(name, df)
    figures = draw(exp.name, tables, info, store)
    write_report(store, exp.name, tables, figures, info)


def stack(arrays: dict, name: str) -> np.ndarray:
    """An array of the records as float32 (records are stored compactly)."""
    return np.asarray(arrays[name], dtype=np.float32)
