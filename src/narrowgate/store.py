"""The run directory: manifest, per-example records written incrementally, tables, figures.

Layout of ``DIR``::

    lock                          who writes to the directory now (pid, host, since, command)
    manifest.json                 command, config, run id, versions, model and its fingerprint, data sources, seed
    records/part-<rank>-<n>.parquet   per-example rows (column ``example_id`` + scalars)
    records/part-<rank>-<n>.safetensors  per-example arrays of that shard (optional)
    failures/part-<rank>-<n>.parquet  examples that could not be used, with the reason
    damaged/                      shards set aside as damaged, to be redone (`RunStore.check_shards`)
    tables/<name>.csv|.parquet    aggregate tables
    figures/<name>.png|.pdf       figures
    report.html

Residuals are stored as bfloat16 (`BFloat16`: half the size of float32, float32's range, so no
activation overflows as it would in float16); a non-finite residual is refused, naming the example and
the residual index. Every file is written to a temporary name and renamed (`fileio.atomic_write`), so a killed run or a
full disk leaves only whole files; a shard's Parquet file is renamed last and marks it as done, and
its metadata names the run and the arrays beside it. Rerunning on the same directory skips the
examples already recorded (or recorded as failures; ``retry_failed`` processes those again); a
manifest of another run is refused, and one whose run produced no record is replaced. One process writes at a time: `RunStore.lock` takes the directory's `DirectoryLock` (released
by the kernel when its holder dies, so a killed run's lock is taken over, with a message; a ``lock``
that is a link or not a regular file is refused, never followed). No pickle anywhere.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import platform
import socket
import stat
import sys
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from .errors import NarrowgateError, OptionError
from .fileio import BadSafetensors, atomic_write, safetensors_header

#: Parquet metadata keys of every shard: the run it belongs to, and the arrays written beside it.
RUN_ID, ARRAYS = b"narrowgate.run_id", b"narrowgate.arrays"

PACKAGES = ("narrowgate", "torch", "transformers", "accelerate", "numpy", "pandas", "dadapy", "scikit-learn")


logger = logging.getLogger("narrowgate.run")


class ManifestMismatch(NarrowgateError, RuntimeError):
    """The directory holds a run of a different configuration."""


class RunLocked(NarrowgateError, RuntimeError):
    """Another process is writing to the run directory."""


class NonFiniteResidual(NarrowgateError, ValueError):
    """A residual to store is inf or NaN (the model's activations overflowed); nothing of the shard is written."""


def versions() -> dict[str, str]:
    """Python, platform and the `PACKAGES` versions, for the manifest: what a run's numbers were computed with."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _describe(holder: str) -> str:
    try:
        h = json.loads(holder)
        return f"pid {h['pid']} on {h['host']} since {h['since']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return holder or "unknown process"


def _difference(there, now) -> str:
    """The keys where two manifest entries differ, as ``key: there -> now``."""
    if isinstance(there, dict) and isinstance(now, dict):
        keys = sorted(k for k in set(there) | set(now) if there.get(k) != now.get(k))
        return "; ".join(f"{k}: {there.get(k)!r} there, {now.get(k)!r} now" for k in keys)
    return f"{there!r} there, {now!r} now"


@dataclass(frozen=True)
class BFloat16:
    """Values a run stores as bfloat16 (residuals): ``values`` [n_rows, ...], rounded to nearest even when written,
    read back as float32. ``resids``: the residual index of each entry of axis 1 ([n_rows, resid, ...]), or the
    one index of [n_rows, D] values, to name it in an error."""

    values: np.ndarray
    resids: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.values)


#: Safetensors metadata key listing the arrays of a shard stored as bfloat16 bits (uint16).
_BF16_KEY = "narrowgate.bfloat16"


def _bf16_bits(name: str, array: BFloat16, ids: list) -> np.ndarray:
    """float -> bfloat16 bits (uint16, round to nearest even); refuses a non-finite value, naming its example and
    its residual index."""
    x = np.ascontiguousarray(array.values, dtype=np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        where = np.argwhere(bad)[0]
        resid = None if array.resids is None else array.resids[0] if x.ndim == 2 else array.resids[int(where[1])]
        at = "" if resid is None else f" at resid {resid}"
        raise NonFiniteResidual(
            f"example {ids[int(where[0])]}: a non-finite residual ({x[tuple(where)]}) in {name!r}{at}: the model's "
            "activations overflowed (load it in float32 or bfloat16, not float16)."
        )
    bits = x.view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    out = rounded.astype(np.uint16)
    if not np.isfinite(_from_bf16_bits(out)).all():  # the largest float32 values round up to inf
        raise NonFiniteResidual(f"a residual in {name!r} is too large for bfloat16 (above 3.39e38).")
    return out


def _from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    """A shard's arrays, bfloat16 ones back as float32."""
    arrays = load_file(str(path))
    with safe_open(str(path), framework="np") as f:
        bf16 = ((f.metadata() or {}).get(_BF16_KEY) or "").split("\n")
    return {k: _from_bf16_bits(v) if k in bf16 else v for k, v in arrays.items()}


class DirectoryLock:
    """The exclusive lock of a directory that one process writes to (a run directory, a fine-tuning ``--out``).

    An advisory ``flock`` on ``DIR/lock``, which holds who writes (pid, host, since, command). The kernel
    drops the lock when its process dies, so a lock left by a killed process is taken over, with a warning
    naming that process. ``DIR/lock`` is opened without following links and must be a regular file with
    one name: a symbolic link, a hard link to another file, a FIFO or a device is refused, never truncated
    or read. Use as a context manager, or `acquire` / `release`.
    """

    def __init__(self, directory: str | os.PathLike, command: str = ""):
        self.directory = Path(directory)
        self.path = self.directory / "lock"
        self.command = command
        self._fd: int | None = None

    def _refuse(self, what: str) -> RunLocked:
        return RunLocked(
            f"{self.path} is {what}, not the regular file narrowgate writes; it is never followed, read or "
            "truncated. Remove it if no run is using the directory, or use another --out."
        )

    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise self._refuse("a symbolic link") from None
            if e.errno in (errno.EISDIR, errno.ENXIO):
                raise self._refuse("a directory or a device") from None
            raise
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            raise self._refuse("a hard link to another file" if stat.S_ISREG(info.st_mode) else "not a file")
        return fd

    def acquire(self, command: str | None = None) -> None:
        """Take the lock (recording ``command``, default the one given at construction), or raise `RunLocked`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            raise RunLocked(
                f"{self.directory} is in use by another run ({_describe(holder)}); wait for it to finish, "
                "or use another --out."
            ) from None
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if previous:
            logger.warning(
                "%s: taking over the lock of a run that ended without releasing it (%s)",
                self.directory,
                _describe(previous),
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": self.command if command is None else command,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Release the lock (emptying the file marks a clean release)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class Shard:
    """A run's records read back (`RunStore.records`): one row per example, and the arrays aligned with the rows."""

    rows: pd.DataFrame
    arrays: dict[str, np.ndarray]  # name -> [n_rows, ...], aligned with rows


class RunStore:
    """One run directory. ``rank`` separates the shards of concurrent processes."""

    def __init__(self, path: str | os.PathLike, *, rank: int = 0):
        self.path = Path(path)
        self.rank = rank
        if self.path.exists() and not self.path.is_dir():
            raise OptionError(f"--out {self.path} is a file, not a run directory: give --out a folder.")
        for sub in ("records", "failures", "tables", "figures"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        self._counter = self._next_counter()
        self._lock: DirectoryLock | None = None
        #: The manifest's run id, written into every shard's metadata (`open_manifest` sets it).
        self.run_id: str | None = None

    # --- lock -----------------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        """``DIR/lock``, the file of the directory's `DirectoryLock`."""
        return self.path / "lock"

    def lock(self, command: str = "") -> None:
        """Take the directory's exclusive lock (`DirectoryLock`), or raise `RunLocked` naming its holder.

        Data-parallel ranks share rank 0's lock (`narrowgate.runner.run` arranges this).
        """
        lock = DirectoryLock(self.path)
        lock.acquire(command)
        self._lock = lock

    def unlock(self) -> None:
        """Release the lock (emptying the file marks a clean release)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # --- manifest -------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        """``DIR/manifest.json``."""
        return self.path / "manifest.json"

    def open_manifest(
        self, manifest: dict, *, key_fields: tuple[str, ...] = ("experiment", "config"), work: tuple[str, ...] = ()
    ) -> dict:
        """Write the manifest, or check that an existing one describes the same run (resume).

        Refused, naming what differs: a manifest of another run (any of ``key_fields`` different, or
        missing: an edited or older manifest cannot vouch for its records), one that is not JSON, and
        records without a manifest. A directory whose run never produced a record (every example
        failed, or the setup did) is replaced instead, with a warning: nothing computed is lost.
        ``work`` names the files and folders, beside records, that hold computed results (a fine-tune's
        scores, checkpoint and adapter): a directory holding any of them is never replaced.
        Once the manifest is settled, damaged shards are set aside to be redone (`check_shards`).
        """
        if self.rank != 0:
            deadline = time.time() + 600
            while not self.manifest_path.exists() and time.time() < deadline:
                time.sleep(0.1)
        if self.manifest_path.exists():
            refusal, old = self._compare(manifest, key_fields)
            if refusal is None:
                self.run_id = old.get("run_id")
                if self.rank == 0:  # the other ranks wait for this at the runner's barrier
                    self.check_shards()
                return old
            if self.rank != 0 or self._parts("records") or any((self.path / w).exists() for w in work):
                raise ManifestMismatch(refusal)
            self._replace(refusal)
        elif self._parts("records") or self._parts("failures"):
            raise ManifestMismatch(
                f"{self.path} holds records but no manifest.json, so nothing tells which run they belong to: "
                "restore manifest.json, or use another --out."
            )
        self.run_id = uuid.uuid4().hex
        manifest = {
            **manifest,
            "run_id": self.run_id,
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write(self.manifest_path, lambda p: p.write_text(json.dumps(manifest, indent=2, default=str)))
        return manifest

    def _compare(self, manifest: dict, key_fields: tuple[str, ...]) -> tuple[str | None, dict]:
        """Why the manifest on disk does not describe the run ``manifest`` describes (None: it does), and it."""
        try:
            old = json.loads(self.manifest_path.read_bytes())
        except (ValueError, RecursionError) as e:
            return f"{self.manifest_path} is not valid JSON ({' '.join(str(e).split())[:80]}); use another --out.", {}
        if not isinstance(old, dict):
            return f"{self.manifest_path} is not a narrowgate manifest (not a JSON object); use another --out.", {}
        for k in key_fields:
            if k not in old:
                return (
                    f"{self.manifest_path} has no {k!r} (it was edited, or written by an older narrowgate), so it "
                    "cannot be checked that its records belong to this run: use another --out."
                ), old
            if old[k] != manifest.get(k):
                return (
                    f"{self.path} already holds a run with a different {k} ({_difference(old[k], manifest.get(k))}). "
                    "Use another --out directory, or rerun the same command to resume."
                ), old
        return None, old

    def _replace(self, reason: str) -> None:
        """Clear a run that produced no record (its failures, tables, figures, report, manifest) for a new one."""
        logger.warning(
            "%s: replacing a run that produced no record (%d failure record(s)); it differed: %s",
            self.path,
            len(self._parts("failures")),
            reason,
        )
        for sub in ("failures", "tables", "figures"):
            for f in (self.path / sub).iterdir():
                if f.is_file() and not f.is_symlink():
                    f.unlink()
        (self.path / "report.html").unlink(missing_ok=True)
        self.manifest_path.unlink()
        self._counter = self._next_counter()

    # --- records --------------------------------------------------------------------------------
    def _next_counter(self) -> int:
        parts = list((self.path / "records").glob(f"part-{self.rank}-*.parquet"))
        parts += list((self.path / "failures").glob(f"part-{self.rank}-*.parquet"))
        nums = [int(p.stem.rsplit("-", 1)[1]) for p in parts]
        return max(nums, default=-1) + 1

    def _shard_name(self) -> str:
        name = f"part-{self.rank}-{self._counter:06d}"
        self._counter += 1
        return name

    def write(self, rows: list[dict], arrays: dict[str, np.ndarray | BFloat16] | None = None) -> None:
        """Append one shard of per-example rows (each with ``example_id``) and aligned arrays (`BFloat16` ones
        stored as bfloat16)."""
        if not rows:
            return
        if any("example_id" not in r for r in rows):
            raise ValueError("Every record needs an 'example_id'.")
        name = self._shard_name()
        if arrays:
            for k, v in arrays.items():
                if len(v) != len(rows):
                    raise ValueError(f"Array {k!r} has {len(v)} rows, the shard has {len(rows)} records.")
            ids = [r["example_id"] for r in rows]
            data = {
                k: _bf16_bits(k, v, ids) if isinstance(v, BFloat16) else np.ascontiguousarray(v)
                for k, v in arrays.items()
            }
            meta = {_BF16_KEY: "\n".join(k for k, v in arrays.items() if isinstance(v, BFloat16))}
            atomic_write(
                self.path / "records" / f"{name}.safetensors", lambda p: save_file(data, str(p), metadata=meta)
            )
        table = self._stamped(pd.DataFrame(rows), sorted(arrays or ()))
        atomic_write(self.path / "records" / f"{name}.parquet", lambda p: pq.write_table(table, p))

    def fail(self, example_id: str, reason: str) -> None:
        """Record an example that could not be used."""
        name = self._shard_name()
        table = self._stamped(pd.DataFrame([{"example_id": str(example_id), "reason": reason}]), [])
        atomic_write(self.path / "failures" / f"{name}.parquet", lambda p: pq.write_table(table, p))

    def _stamped(self, df: pd.DataFrame, arrays: list[str]) -> pa.Table:
        """``df`` as a table whose metadata names this run and the arrays written beside it."""
        table = pa.Table.from_pandas(df, preserve_index=False)
        stamp = {RUN_ID: (self.run_id or "").encode(), ARRAYS: json.dumps(arrays).encode()}
        return table.replace_schema_metadata({**(table.schema.metadata or {}), **stamp})

    def check_shards(self) -> None:
        """Set aside damaged shards so their examples are processed again; refuse a foreign one.

        A shard whose Parquet file cannot be read (truncated, not Parquet) or whose arrays file is missing
        or truncated is moved, with its arrays, to ``DIR/damaged/`` (a warning names it): its examples
        count as not done. A shard of another run (its run id differs from the manifest's) or that is
        not a narrowgate shard (no ``example_id``) is refused, naming the file to move out.
        """
        for sub in ("records", "failures"):
            for part in self._parts(sub):
                try:
                    schema = pq.read_schema(part)
                except (pa.ArrowException, OSError) as e:
                    self._set_aside(part, f"unreadable ({' '.join(str(e).split())[:120]})")
                    continue
                meta = schema.metadata or {}
                owner = meta.get(RUN_ID, b"").decode(errors="replace")
                if "example_id" not in schema.names or (self.run_id and owner != self.run_id):
                    what = "not a narrowgate record shard" if "example_id" not in schema.names else "from another run"
                    raise ManifestMismatch(
                        f"{part} is {what} (this run's id is {self.run_id}): move it out of {self.path / sub}, "
                        "then rerun."
                    )
                arrays = json.loads(meta.get(ARRAYS, b"[]"))
                if sub == "records" and arrays:
                    tensors = part.with_suffix(".safetensors")
                    try:
                        names = set(safetensors_header(tensors)[1])
                    except (BadSafetensors, OSError) as e:
                        self._set_aside(part, f"its arrays file is missing or damaged ({e})")
                        continue
                    if not set(arrays) <= names:
                        self._set_aside(part, f"its arrays file lacks {sorted(set(arrays) - names)[:3]}")

    def _set_aside(self, part: Path, why: str) -> None:
        """Move a damaged shard (and its arrays) to ``DIR/damaged/``, so its examples are done again."""
        target = self.path / "damaged" / part.parent.name
        target.mkdir(parents=True, exist_ok=True)
        for f in (part, part.with_suffix(".safetensors")):
            if f.exists():
                os.replace(f, target / f.name)
        logger.warning("%s is damaged: %s; moved to %s, its examples will be processed again", part, why, target)

    def _parts(self, sub: str) -> list[Path]:
        return sorted((self.path / sub).glob("part-*.parquet"))

    def _ids(self, sub: str) -> set[str]:
        out: set[str] = set()
        for p in self._parts(sub):
            out.update(pq.read_table(p, columns=["example_id"]).column("example_id").to_pylist())
        return out

    def recorded_digests(self, column: str = "data_sha256") -> dict[str, str | None]:
        """Each recorded example id with the digest of its data when it was recorded (None if not kept)."""
        out: dict[str, str | None] = {}
        for p in self._parts("records"):
            names = pq.read_schema(p).names
            table = pq.read_table(p, columns=["example_id", *([column] if column in names else [])])
            digests = table.column(column).to_pylist() if column in names else [None] * table.num_rows
            out.update(zip(table.column("example_id").to_pylist(), digests))
        return out

    def done_ids(self, *, retry_failed: bool = False) -> set[str]:
        """Ids already recorded by any rank, and those recorded as failures unless ``retry_failed``."""
        return self._ids("records") if retry_failed else self._ids("records") | self._ids("failures")

    def failures(self) -> pd.DataFrame:
        """Examples that could not be used (the latest reason of each), less those recorded since (a retry)."""
        parts = [pq.read_table(p).to_pandas() for p in self._parts("failures")]
        if not parts:
            return pd.DataFrame(columns=["example_id", "reason"])
        df = pd.concat(parts).drop_duplicates("example_id", keep="last")
        df = df[~df["example_id"].isin(self._ids("records"))]
        return df.sort_values("example_id").reset_index(drop=True)

    def records(self) -> Shard:
        """All records, one row per example id (sorted), with their arrays aligned."""
        frames: list[pd.DataFrame] = []
        arrays: dict[str, list[np.ndarray]] = {}
        for p in self._parts("records"):
            df = pq.read_table(p).to_pandas()
            frames.append(df)
            tensors = p.with_suffix(".safetensors")
            if tensors.exists():
                for k, v in _load_arrays(tensors).items():
                    arrays.setdefault(k, []).append(v)
        if not frames:
            return Shard(pd.DataFrame(columns=["example_id"]), {})
        rows = pd.concat(frames, ignore_index=True)
        joined = {k: np.concatenate(v) for k, v in arrays.items()}
        for k, v in joined.items():
            if len(v) != len(rows):
                raise RuntimeError(f"Array {k!r} is missing from some shards of {self.path}.")
        keep = ~rows["example_id"].duplicated()
        order = np.argsort(rows.loc[keep, "example_id"].to_numpy(), kind="stable")
        idx = np.flatnonzero(keep.to_numpy())[order]
        return Shard(rows.iloc[idx].reset_index(drop=True), {k: v[idx] for k, v in joined.items()})

    # --- outputs --------------------------------------------------------------------------------
    def write_table(self, name: str, df: pd.DataFrame) -> None:
        """Write aggregate table ``name`` to ``DIR/tables`` as CSV (to read) and Parquet (to load back with its
        types), each atomically."""
        atomic_write(self.path / "tables" / f"{name}.csv", lambda p: df.to_csv(p, index=False))
        table = pa.Table.from_pandas(df, preserve_index=False)
        atomic_write(self.path / "tables" / f"{name}.parquet", lambda p: pq.write_table(table, p))

    def tables(self) -> dict[str, pd.DataFrame]:
        """The aggregate tables written so far, by name (from their Parquet copies)."""
        return {p.stem: pq.read_table(p).to_pandas() for p in sorted((self.path / "tables").glob("*.parquet"))}

    def figure_path(self, name: str, ext: str) -> Path:
        """Where figure ``name`` goes in format ``ext``: ``DIR/figures/<name>.<ext>``."""
        return self.path / "figures" / f"{name}.{ext}"
