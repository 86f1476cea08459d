"""The one runner: executes any experiment (`narrowgate.analyses`) resumably.

It owns everything an experiment does not: checking the settings and the data before the model
loads, the run directory (its lock, and a manifest written only once the run can start), skipping
units already done, loading images and processing them (an example whose image is bad, or whose
processing raises, is recorded as a failure with its reason and skipped), progress, batch-size
back-off on out-of-memory, tables, figures and the report. Examples may come as a stream (synthetic
data of any size is never built up front). Under torchrun each rank works on its shard
(`narrowgate.distributed.Ranks`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import shlex
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sized
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from . import compat
from .analyses import options
from .analyses.base import C, Experiment, Sample, Unit
from .data import BadExample, example_digest, prompts
from .distributed import Ranks
from .errors import DataError, OptionError
from .parsing import check_count, parse_image_size, parse_size
from .progress import progress_bar
from .store import ManifestMismatch, NonFiniteResidual, RunStore

if TYPE_CHECKING:
    from .vlm import VLM

_T = TypeVar("_T")

logger = logging.getLogger("narrowgate.run")


class ReportWriter(Protocol):
    """Writes a run's report (`narrowgate.report.write_report`)."""

    def __call__(self, store: RunStore, experiment: str, tables: dict, figures: list[str], info: dict) -> None:
        """Write ``store``'s report of ``experiment`` from its tables, figure names and model info."""


#: Settings that may change between a run and its resumption without changing its results (``axis``: figures only).
RUN_ONLY = ("axis", "batch_size", "device_map", "max_memory", "memory_budget", "out", "progress", "retry_failed")


def default_out(experiment: str, model: str) -> Path:
    """Where a run goes when ``--out`` is not given: runs/<experiment>-<model>-<time>."""
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
    exp: Experiment[C],
    vlm: VLM,
    units: list[Unit],
    images: list[tuple],
    cfg: C,
    store: RunStore,
    batch_size: int,
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
    exp: Experiment[C],
    vlm: VLM,
    chunk: list[Unit],
    imgs: list[tuple],
    cfg: C,
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


def check_config(cfg: Mapping[str, Any], config: type) -> None:
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


#: Below this many examples a mean of values in [0, 1] can have a standard error above 0.1 (0.5 / sqrt(n)).
SMALL_SAMPLE = 25


def warn_small(examples: Sample) -> None:
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


def settings_of(exp: Experiment[C], given: Mapping[str, Any] | options.RunConfig) -> C:
    """The one settings instance of a run of ``exp``: ``given`` (a dict of setting names, or an instance of
    ``exp.config``) over the experiment's defaults, checked as the command line checks it.

    An unknown name, a count below 1, a value outside a setting's choices, a malformed image size, device map or
    memory budget, or a required setting (model, data) left out is refused with an `OptionError` naming it.
    """
    if isinstance(given, options.RunConfig):
        if not isinstance(given, exp.config):
            raise OptionError(
                f"{exp.name} takes {exp.config.__name__} settings, not {type(given).__name__}: give a dict of "
                f"settings or a {exp.config.__name__}."
            )
        given = {f.name: getattr(given, f.name) for f in fields(given)}
    unknown = sorted(set(given) - set(options.names(exp.config)))
    if unknown:
        raise OptionError(
            f"{exp.name} has no setting {', '.join(map(repr, unknown))}; its settings: "
            f"{', '.join(options.names(exp.config))}."
        )
    values = {**exp.defaults, **{k: v for k, v in given.items() if v is not None}}
    check_config(values, exp.config)
    missing = [f.name for f in fields(exp.config) if f.metadata.get("required") and values.get(f.name) is None]
    if missing:
        raise OptionError(f"{exp.name} needs {' and '.join(missing)}: give {', '.join(f'{m}=...' for m in missing)}.")
    if values.get("image_size") is not None:
        parse_image_size(values["image_size"])
    from .loading import check_device_map

    check_device_map(values.get("device_map"))
    parse_size(values.get("memory_budget"))
    return exp.config(**values)


def run(
    exp: Experiment[C],
    cfg: Mapping[str, Any] | options.RunConfig,
    *,
    vlm: VLM | None = None,
    command: list[str] | None = None,
) -> RunStore:
    """Run (or resume) ``exp`` with settings ``cfg`` (a dict of setting names, or an instance of ``exp.config``);
    returns the run directory's store.

    Order: settings and data are checked (nothing written yet), the run directory is locked, the
    model loads and is checked against the settings, and only then is the manifest written (with
    the checkpoint's fingerprint; a resume on another checkpoint, or on data whose recorded examples
    changed, is refused; a directory whose run produced no record is taken over). Under torchrun /
    accelerate launch each rank processes its shard of the units into its own shards of the shared
    run directory, under rank 0's lock; rank 0 then aggregates everything and draws the figures.
    Every hook of ``exp`` receives the same settings instance (`settings_of`).
    """
    settings = settings_of(exp, cfg)
    examples = exp.examples(settings)
    exp.check(examples, settings)
    warn_small(examples)
    ranks = Ranks.from_env()
    ranks.init()
    if ranks.world > 1 and not settings.out:
        raise OptionError("With several processes, give --out: every rank must write to the same run directory.")
    out = Path(settings.out or default_out(exp.name, settings.model))
    store = RunStore(out, rank=ranks.rank)
    command_text = shlex.join(command if command is not None else sys.argv)
    ranks.lock(store, command_text)
    try:
        return _run_locked(exp, settings, vlm, examples, store, ranks, command_text)
    finally:
        store.unlock()


def _run_locked(
    exp: Experiment[C],
    cfg: C,
    vlm: VLM | None,
    examples: Sample,
    store: RunStore,
    ranks: Ranks,
    command_text: str,
) -> RunStore:
    """`run` once the directory is locked: load and check the model, write the manifest, process, finish."""
    from .loading import load

    if vlm is None:
        device_map, max_memory = cfg.device_map, cfg.max_memory
        if ranks.world > 1 and torch.cuda.is_available():
            import os

            group = ranks.gpus(torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            if device_map is None and len(group) == 1:
                device_map = f"cuda:{group[0]}"
            elif max_memory is None:  # spread this rank's model over its own GPUs only
                device_map = device_map or "auto"
                max_memory = {i: int(torch.cuda.mem_get_info(i)[0] * 0.9) for i in group}
                max_memory["cpu"] = "64GiB"
        vlm = load(cfg.model, dtype=cfg.dtype, device_map=device_map, max_memory=max_memory)
    previous = vlm.budget
    if cfg.memory_budget is not None:
        vlm.memory_budget = cfg.memory_budget
    try:
        return _run_with(exp, cfg, vlm, examples, store, ranks, command_text)
    finally:
        vlm.budget = previous  # a model handed in is left as it was found


def _run_with(
    exp: Experiment[C],
    cfg: C,
    vlm: VLM,
    examples: Sample,
    store: RunStore,
    ranks: Ranks,
    command_text: str,
) -> RunStore:
    """`_run_locked` once the model is loaded, with its memory budget set from ``cfg``."""
    from .loading import fingerprint
    from .report import write_report

    info = model_info(vlm)
    exp.check_model(cfg, vlm.n_layers)
    own = getattr(vlm, "checkpoint_prompts", None)
    used = prompts.sources(values(cfg), exp.prompt_kinds(cfg), info["family"], info["n_layers"], own)
    resolved: dict[str, Any] = {key: text for key, (text, _) in used.items()}
    cfg = replace(cfg, **resolved)
    size = prompts.resolve_image_size(values(cfg), info["family"], exp.generates(cfg))["image_size"]
    cfg = replace(cfg, image_size=size)
    units = exp.units(examples, cfg)
    settings = values(cfg)
    store.open_manifest(
        {
            "experiment": exp.name,
            "config": {k: v for k, v in sorted(settings.items()) if k not in RUN_ONLY},
            "fingerprint": fingerprint(cfg.model, info["revision"]),
            "run": {k: settings[k] for k in RUN_ONLY if k in settings},
            "command": command_text,
            "model": info,
            "prompts": {key: {"text": text, "from": where} for key, (text, where) in used.items()},
            "checkpoint_prompts": own.as_json() if own is not None else None,
            "data": {
                "dataset": cfg.data,
                "data_dir": str(cfg.data_dir),
                "seed": cfg.seed,
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
    done = store.done_ids(retry_failed=cfg.retry_failed)
    batch_size = int(cfg.batch_size)
    pixels = parse_image_size(cfg.image_size)
    with progress_bar(disable=not cfg.progress) as progress:
        label = f"{exp.name} ({info['family']})" + (f" rank {ranks.rank}/{ranks.world}" if ranks.world > 1 else "")
        task = progress.add_task(label, total=total)
        for chunk in _chunks(ranks.shard(units), max(batch_size, 1) * 4):
            good, images = _load_images([u for u in chunk if u.id not in done], store, pixels)
            batch_size = _process(exp, vlm, good, images, cfg, store, batch_size)
            progress.update(task, advance=len(chunk))
    ranks.barrier()
    if ranks.rank == 0:
        finish(exp, store, cfg, info, write_report)
    ranks.barrier()
    return store


def sample_counts(examples: Sample, units: Iterable[Unit]) -> dict:
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


def values(cfg: options.RunConfig) -> dict[str, Any]:
    """The settings that have a value, by name (None means "not set"): what the manifest records of a run, as it
    always has (a setting left unset is absent, not null, so runs made before a setting existed still resume)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) is not None}


def finish(exp: Experiment[C], store: RunStore, cfg: C, info: dict, write_report: ReportWriter) -> None:
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
    figures = exp.figures(tables, info, store, cfg) if len(records.rows) else []
    write_report(store, exp.name, tables, figures, info)
