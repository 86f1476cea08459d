"""What an experiment is, and the one runner that executes any of them resumably.

An experiment is one file: its settings (a dataclass, `options`), how it turns examples into work
*units* (one example, or a pair for patching), how it processes a batch of units into per-unit
records, how it aggregates all records into tables, and its figures; ``@register`` makes it a
``narrowgate run`` command. The runner owns
everything else: checking the settings and the data before the model loads, the run directory (its
lock, and a manifest written only once the run can start), skipping units already done, loading
images and processing them (an example whose image is bad, or whose processing raises, is recorded
as a failure with its reason and skipped), progress, batch-size back-off on out-of-memory, tables,
figures and the report. Examples may come as a stream (synthetic data of any size is never built
up front).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import shlex
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import pandas as pd
import torch

from .. import compat
from ..data import BadExample, example_digest
from ..errors import DataError, OptionError, check_count, parse_image_size, parse_size
from ..progress import progress_bar
from ..store import ManifestMismatch, NonFiniteResidual, RunLocked, RunStore
from . import options, prompts, tasks

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..data.base import Example
    from ..store import Shard
    from ..vlm import VLM

_T = TypeVar("_T")


class ReportWriter(Protocol):
    """Writes a run's report (`narrowgate.report.write_report`)."""

    def __call__(self, store: RunStore, experiment: str, tables: dict, figures: list[str], info: dict) -> None: ...


logger = logging.getLogger("narrowgate.run")

#: Settings that may change between a run and its resumption without changing its results (``axis``: figures only).
RUN_ONLY = ("axis", "batch_size", "device_map", "max_memory", "memory_budget", "out", "progress", "retry_failed")


@dataclass(frozen=True)
class Unit:
    """One piece of work: an id and the examples it needs (one, or two for a patching pair)."""

    id: str
    examples: tuple
    meta: dict = field(default_factory=dict, compare=False, hash=False)


#: Every registered experiment by name (`register`).
REGISTRY: dict[str, type[Experiment]] = {}


def register(cls: type[Experiment]) -> type[Experiment]:
    """Class decorator: make ``cls`` the experiment ``narrowgate run <cls.name>`` runs."""
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


def default_out(experiment: str, model: str) -> Path:
    stem = Path(str(model).rstrip("/")).name or "model"
    return Path("runs") / f"{experiment}-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def model_info(vlm: VLM) -> dict:
    """What a run records of its model: family, sizes, checkpoint and revision, dtype, attention."""
    cfg = vlm.model.config
    return {
        "family": vlm.family.name,
        "model_type": cfg.model_type,
        "n_layers": vlm.n_layers,
        "hidden_size": vlm.hidden_size,
        "name_or_path": compat.name_or_path(cfg),
        "revision": compat.commit_hash(cfg),
        "dtype": str(vlm.model.dtype),
        "attn_implementation": vlm.attn_implementation,
    }


def _load_images(
    units: list[Unit], store: RunStore, size: tuple[int, int] | None = None
) -> tuple[list[Unit], list[tuple]]:
    """The units whose images load (resized to ``size``, width x height, when given) and their images."""
    good, images = [], []
    for unit in units:
        try:
            imgs = tuple(prompts.resize(e.load_image(), size) for e in unit.examples)
        except BadExample as bad:
            logger.warning("skipping %s: %s", unit.id, bad)
            store.fail(unit.id, f"{bad.example_id}: {bad.reason}")
            continue
        good.append(unit)
        images.append(imgs)
    return good, images


def _process(
    exp: Experiment, vlm: VLM, units: list[Unit], images: list[tuple], cfg: dict, store: RunStore, batch_size: int
) -> int:
    """Process ``units`` in batches; halve the batch on out-of-memory (down to 1) and retry.

    A batch that raises anything else (or whose residuals cannot be stored: `NonFiniteResidual`) is processed
    again one unit at a time, and a unit that still fails is recorded as a failure with its reason: one example
    never stops the run for good.
    """
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
        except OptionError:  # a setting wrong for every example: stop, naming it (the run has no record yet)
            raise
        except Exception as e:  # noqa: BLE001 -- any per-example error becomes that example's failure record
            _one_by_one(exp, vlm, chunk, imgs, cfg, store, e)
            i += len(chunk)
            continue
        digests = {u.id: unit_digest(u) for u in chunk}
        try:
            store.write([{**r, DIGEST: digests.get(r["example_id"])} for r in rows], arrays)
        except NonFiniteResidual as e:
            _one_by_one(exp, vlm, chunk, imgs, cfg, store, e)
        i += len(chunk)
    return batch_size


def _one_by_one(
    exp: Experiment,
    vlm: VLM,
    chunk: list[Unit],
    imgs: list[tuple],
    cfg: dict,
    store: RunStore,
    error: Exception,
) -> None:
    """A failed batch again one unit at a time, or the failure record of a single unit."""
    if len(chunk) > 1:
        for j in range(len(chunk)):
            _process(exp, vlm, chunk[j : j + 1], imgs[j : j + 1], cfg, store, 1)
        return
    reason = f"{type(error).__name__}: {' '.join(str(error).split())}"
    logger.warning("skipping %s: %s", chunk[0].id, reason)
    store.fail(chunk[0].id, reason)


#: The records' column holding each unit's `unit_digest`: what its data was when it was recorded.
DIGEST = "data_sha256"


def unit_digest(unit: Unit) -> str:
    """The `example_digest` of a unit's example, or of its examples together (a patching pair)."""
    digests = [example_digest(e) for e in unit.examples]
    return digests[0] if len(digests) == 1 else hashlib.sha256(" ".join(digests).encode()).hexdigest()


def check_data(store: RunStore, units: Iterable[Unit]) -> None:
    """Refuse to resume when the data changed under the same settings: a recorded unit that is no longer in
    the sample (the dataset on disk grew or shrank, so the seeded sample moved), or whose data differs now
    (an annotation or an image file replaced). Streams (synthetic data) are made from the settings alone."""
    if not isinstance(units, list):
        return
    recorded = store.recorded_digests()
    if not recorded:
        return
    now = {u.id: u for u in units}
    gone = sorted(i for i in recorded if i not in now)
    changed = sorted(i for i, d in recorded.items() if i in now and d is not None and d != unit_digest(now[i]))
    if gone or changed:
        what = (
            f"{len(gone)} recorded example(s) are no longer in the sample (e.g. {gone[0]})"
            if gone
            else f"{len(changed)} recorded example(s) changed (e.g. {changed[0]}: its annotations or image file)"
        )
        raise ManifestMismatch(
            f"{store.path} holds records of other data: {what} since the run began. Rerun on the data it began "
            "with, or use another --out."
        )


def check_config(cfg: dict, config: type) -> None:
    """Refuse counts below 1 (``n=0`` is not "the default", ``n=-3`` is not "nothing") and values outside a
    setting's choices, naming the option: the Python API checks what the command line checks."""
    for f in fields(config):
        flag = f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"
        value = cfg.get(f.name)
        if f.metadata.get("min") == 1:
            check_count(value, flag)
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise OptionError(f"{flag} {value!r} is not one of {', '.join(choices)}.")


def _smallest_class(labels: Iterable) -> tuple:
    counts: dict = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    label, smallest = min(counts.items(), key=lambda kv: kv[1])
    return label, smallest, len(counts)


def check_k(labels: Iterable, k: int) -> None:
    """Refuse a neighbourhood overlap whose k the smallest class cannot support, before the model loads.

    With k above (smallest class - 1) not even a perfect representation can score 1, and with
    k >= N - 1 every representation scores the same number: the result would measure the sample size.
    """
    labels = list(labels)
    if not labels:
        return
    label, smallest, n_classes = _smallest_class(labels)
    if k > smallest - 1:
        raise OptionError(
            f"--k {k} needs at least {k + 1} examples per class, but class {label!r} has {smallest} "
            f"({len(labels)} examples in {n_classes} classes): raise --n-per-class / --n or lower --k."
        )


def check_sweep(cfg: dict, default: int) -> None:
    """Refuse ``--sweep-step`` other than its ``default`` without ``--sweep`` (it would be ignored), before the model
    loads."""
    if not cfg.get("sweep") and int(cfg.get("sweep_step") or default) != default:
        raise OptionError(
            f"--sweep-step {cfg['sweep_step']} applies only with --sweep: add --sweep, or drop --sweep-step."
        )


def sweep_step(cfg: dict, n_layers: int) -> int:
    """``--sweep-step``, refused when larger than the model's decoder layers (the sweep would have one window)."""
    step = int(cfg.get("sweep_step") or 1)
    if step > n_layers:
        raise OptionError(
            f"--sweep-step {step} is more than the model's {n_layers} decoder layers: the sweep would have a single "
            f"window; give --sweep-step {n_layers} or less."
        )
    return step


def overlap_k(labels: Iterable, k: int) -> int:
    """The k the recorded examples support: ``k``, or lower (with a warning; tables show it in column
    ``k``) when failures left a class with k or fewer examples; refused when no k >= 1 is left."""
    label, smallest, _ = _smallest_class(labels)
    if smallest < 2:
        raise DataError(
            f"Class {label!r} has {smallest} recorded example(s): the neighbourhood overlap needs 2 per class."
        )
    if k > smallest - 1:
        logger.warning(
            "failures left class %r with %d examples: neighbourhood overlap uses k=%d, not %d",
            label,
            smallest,
            smallest - 1,
            k,
        )
    return min(k, smallest - 1)


#: Below this many examples a mean of values in [0, 1] can have a standard error above 0.1 (0.5 / sqrt(n)).
SMALL_SAMPLE = 25


def warn_small(examples: Iterable[Example]) -> None:
    """Warn, before the model loads, that a sample of fewer than `SMALL_SAMPLE` examples gives noisy numbers."""
    if isinstance(examples, Sized) and len(examples) < SMALL_SAMPLE:
        n = len(examples)
        logger.warning(
            "a sample of %d examples is small: a mean of %d values in [0, 1] has a standard error of up to %.2f; "
            "compare numbers only with their standard errors (the tables' se columns)",
            n,
            n,
            0.5 / n**0.5,
        )


def _chunks(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


@dataclass(frozen=True)
class Ranks:
    """This process's place among data-parallel workers (torchrun / accelerate launch), from the environment."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
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

    def shard(self, units: Iterable[Unit]) -> Iterable[Unit]:
        """This rank's units: every ``world``-th of the full, ordered list or stream (stable across resumes)."""
        if isinstance(units, list):
            return units[self.rank :: self.world]
        return itertools.islice(units, self.rank, None, self.world)

    def share(self, value: _T) -> _T:
        """Rank 0's ``value``, on every rank (a picklable object through the process group)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def lock(self, store: RunStore, command: str) -> None:
        """Take ``store``'s directory lock on rank 0 for every rank, or raise `RunLocked` on every rank."""
        refused = None
        if self.rank == 0:
            try:
                store.lock(command)
            except RunLocked as e:
                refused = str(e)
        refused = self.share(refused)
        if refused:
            raise RunLocked(refused)


def run(exp: Experiment, cfg: dict, *, vlm: VLM | None = None, command: list[str] | None = None) -> RunStore:
    """Run (or resume) ``exp`` with settings ``cfg``; returns the run directory's store.

    Order: settings and data are checked (nothing written yet), the run directory is locked, the
    model loads and is checked against the settings, and only then is the manifest written (with
    the checkpoint's fingerprint; a resume on another checkpoint, or on data whose recorded examples
    changed, is refused; a directory whose run produced no record is taken over). Under torchrun /
    accelerate launch each rank processes its shard of the units into its own shards of the shared
    run directory, under rank 0's lock; rank 0 then aggregates everything and draws the figures.
    """
    unknown = sorted(set(cfg) - set(options.names(exp.config)))
    if unknown:
        raise OptionError(
            f"{exp.name} has no setting {', '.join(map(repr, unknown))}; its settings: "
            f"{', '.join(options.names(exp.config))}."
        )
    cfg = {**exp.defaults, **{k: v for k, v in cfg.items() if v is not None}}
    check_config(cfg, exp.config)
    if cfg.get("image_size") is not None:
        parse_image_size(cfg["image_size"])
    from ..loading import check_device_map

    check_device_map(cfg.get("device_map"))
    parse_size(cfg.get("memory_budget"))
    examples = exp.examples(cfg)
    exp.check(examples, cfg)
    warn_small(examples)
    ranks = Ranks.from_env()
    ranks.init()
    if ranks.world > 1 and not cfg.get("out"):
        raise OptionError("With several processes, give --out: every rank must write to the same run directory.")
    out = Path(cfg.get("out") or default_out(exp.name, cfg["model"]))
    store = RunStore(out, rank=ranks.rank)
    command_text = shlex.join(command if command is not None else sys.argv)
    ranks.lock(store, command_text)
    try:
        return _run_locked(exp, cfg, vlm, examples, store, ranks, command_text)
    finally:
        store.unlock()


def _run_locked(
    exp: Experiment,
    cfg: dict,
    vlm: VLM | None,
    examples: Iterable[Example],
    store: RunStore,
    ranks: Ranks,
    command_text: str,
) -> RunStore:
    """`run` once the directory is locked: load and check the model, write the manifest, process, finish."""
    from ..loading import load

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
    previous = vlm.budget
    if cfg.get("memory_budget") is not None:
        vlm.memory_budget = cfg["memory_budget"]
    try:
        return _run_with(exp, cfg, vlm, examples, store, ranks, command_text)
    finally:
        vlm.budget = previous  # a model handed in is left as it was found


def _run_with(
    exp: Experiment,
    cfg: dict,
    vlm: VLM,
    examples: Iterable[Example],
    store: RunStore,
    ranks: Ranks,
    command_text: str,
) -> RunStore:
    """`_run_locked` once the model is loaded, with its memory budget set from ``cfg``."""
    from ..loading import fingerprint
    from ..report import write_report

    info = model_info(vlm)
    exp.check_model(cfg, vlm.n_layers)
    own = getattr(vlm, "checkpoint_prompts", None)
    used = prompts.sources(cfg, exp.prompt_kinds(cfg), info["family"], info["n_layers"], own)
    cfg = {**cfg, **{key: text for key, (text, _) in used.items()}}
    cfg = prompts.resolve_image_size(cfg, info["family"], exp.generates(cfg))
    units = exp.units(examples, cfg)
    key_cfg = {k: v for k, v in sorted(cfg.items()) if k not in RUN_ONLY and v is not None}
    store.open_manifest(
        {
            "experiment": exp.name,
            "config": key_cfg,
            "fingerprint": fingerprint(cfg["model"], info["revision"]),
            "run": {k: cfg.get(k) for k in RUN_ONLY if k in cfg},
            "command": command_text,
            "model": info,
            "prompts": {key: {"text": text, "from": where} for key, (text, where) in used.items()},
            "checkpoint_prompts": own.as_json() if own is not None else None,
            "data": {
                "dataset": cfg["data"],
                "data_dir": str(cfg.get("data_dir")),
                "seed": cfg["seed"],
                "requested": exp.requested(cfg),
                "actual": sample_counts(examples, units),
            },
        },
        key_fields=("experiment", "config", "fingerprint"),
    )
    ranks.barrier()  # rank 0 has set damaged shards aside before any rank reads what is done
    if isinstance(units, list):  # streams (synthetic data) number their ids, unique by construction
        ids = [u.id for u in units]
        if len(set(ids)) != len(ids):
            raise RuntimeError(f"{exp.name}: work unit ids are not unique.")
    sized = units if isinstance(units, Sized) else examples if isinstance(examples, Sized) else None
    total = len(range(ranks.rank, len(sized), ranks.world)) if sized is not None else None
    check_data(store, units)
    done = store.done_ids(retry_failed=bool(cfg.get("retry_failed")))
    batch_size = int(cfg["batch_size"])
    size = parse_image_size(cfg["image_size"])
    with progress_bar(disable=not cfg.get("progress", True)) as progress:
        label = f"{exp.name} ({info['family']})" + (f" rank {ranks.rank}/{ranks.world}" if ranks.world > 1 else "")
        task = progress.add_task(label, total=total)
        for chunk in _chunks(ranks.shard(units), max(batch_size, 1) * 4):
            good, images = _load_images([u for u in chunk if u.id not in done], store, size)
            batch_size = _process(exp, vlm, good, images, cfg, store, batch_size)
            progress.update(task, advance=len(chunk))
    ranks.barrier()
    if ranks.rank == 0:
        finish(exp, store, cfg, info, write_report)
    ranks.barrier()
    return store


def sample_counts(examples: Iterable[Example], units: Iterable[Unit]) -> dict:
    """How many examples (and classes, and images per class) and work units a run has.

    A streamed source (synthetic data) is not consumed here: only what it knows of its size is recorded.
    """
    out = {}
    if isinstance(examples, Sized):
        out["examples"] = len(examples)
    if isinstance(units, Sized):
        out["units"] = len(units)
    if not isinstance(examples, list):
        return out
    labels = [getattr(e, "label", None) for e in examples]
    if examples and all(lab is not None for lab in labels):
        per: dict = {}
        for lab in labels:
            per[lab] = per.get(lab, 0) + 1
        out.update(classes=len(per), min_per_class=min(per.values()), max_per_class=max(per.values()))
    return out


def finish(exp: Experiment, store: RunStore, cfg: dict, info: dict, write_report: ReportWriter) -> None:
    """Aggregate every record into tables, then figures and the report."""
    records = store.records()
    failures = store.failures()
    if not len(records.rows) and len(failures):
        first = failures.iloc[0]
        raise DataError(
            f"No example of {store.path} could be processed: {len(failures)} failure(s), e.g. {first['example_id']}: "
            f"{first['reason']}. Fix the cause and rerun with --retry-failed (see {store.path / 'failures'})."
        )
    tables = exp.aggregate(records, cfg, info) if len(records.rows) else {}
    tables["failures"] = failures
    for name, df in tables.items():
        store.write_table(name, df)
    figures = exp.figures(tables, {**info, "settings": cfg}, store) if len(records.rows) else []
    write_report(store, exp.name, tables, figures, info)


def stack(arrays: dict, name: str) -> np.ndarray:
    """An array of the records as float32 (records are stored compactly)."""
    return np.asarray(arrays[name], dtype=np.float32)
