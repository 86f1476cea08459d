"""The run directory: manifest, per-example records written incrementally, tables, figures.

Layout of ``DIR``::

    manifest.json                 command, config, versions, model, data sources, seed
    records/part-<rank>-<n>.parquet   per-example rows (column ``example_id`` + scalars)
    records/part-<rank>-<n>.safetensors  per-example arrays of that shard (optional)
    failures/part-<rank>-<n>.parquet  examples that could not be used, with the reason
    tables/<name>.csv|.parquet    aggregate tables
    figures/<name>.png|.pdf       figures
    report.html

Every shard is written to a temporary name and renamed, so a killed run leaves only whole shards;
the Parquet file is renamed last and marks the shard as done. Rerunning on the same directory
skips the examples already recorded (or recorded as failures). No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import load_file, save_file

PACKAGES = ("narrowgate", "torch", "transformers", "accelerate", "numpy", "pandas", "dadapy", "scikit-learn")


class ManifestMismatch(RuntimeError):
    """The directory holds a run of a different configuration."""


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


@dataclass
class Shard:
    rows: pd.DataFrame
    arrays: dict[str, np.ndarray]  # name -> [n_rows, ...], aligned with rows


class RunStore:
    """One run directory. ``rank`` separates the shards of concurrent processes."""

    def __init__(self, path: str | os.PathLike, *, rank: int = 0):
        self.path = Path(path)
        self.rank = rank
        for sub in ("records", "failures", "tables", "figures"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        self._counter = self._next_counter()

    # --- manifest -------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def open_manifest(self, manifest: dict, *, key_fields: tuple[str, ...] = ("experiment", "config")) -> dict:
        """Write the manifest, or check that an existing one describes the same run (resume)."""
        if self.rank != 0:
            deadline = time.time() + 600
            while not self.manifest_path.exists() and time.time() < deadline:
                time.sleep(0.1)
        if self.manifest_path.exists():
            old = json.loads(self.manifest_path.read_text())
            for k in key_fields:
                if old.get(k) != manifest.get(k):
                    raise ManifestMismatch(
                        f"{self.path} already holds a run with a different {k}:\n  there: {old.get(k)}\n  now:   "
                        f"{manifest.get(k)}\nUse another --out directory, or rerun the same command to resume."
                    )
            return old
        manifest = {**manifest, "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _atomic_write(self.manifest_path, lambda p: p.write_text(json.dumps(manifest, indent=2, default=str)))
        return manifest

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

    def write(self, rows: list[dict], arrays: dict[str, np.ndarray] | None = None) -> None:
        """Append one shard of per-example rows (each with ``example_id``) and aligned arrays."""
        if not rows:
            return
        if any("example_id" not in r for r in rows):
            raise ValueError("Every record needs an 'example_id'.")
        name = self._shard_name()
        if arrays:
            for k, v in arrays.items():
                if len(v) != len(rows):
                    raise ValueError(f"Array {k!r} has {len(v)} rows, the shard has {len(rows)} records.")
            data = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
            _atomic_write(self.path / "records" / f"{name}.safetensors", lambda p: save_file(data, str(p)))
        table = pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False)
        _atomic_write(self.path / "records" / f"{name}.parquet", lambda p: pq.write_table(table, p))

    def fail(self, example_id: str, reason: str) -> None:
        """Record an example that could not be used."""
        name = self._shard_name()
        table = pa.Table.from_pandas(pd.DataFrame([{"example_id": str(example_id), "reason": reason}]))
        _atomic_write(self.path / "failures" / f"{name}.parquet", lambda p: pq.write_table(table, p))

    def _parts(self, sub: str) -> list[Path]:
        return sorted((self.path / sub).glob("part-*.parquet"))

    def done_ids(self) -> set[str]:
        """Ids already recorded, as records or failures, by any rank."""
        out: set[str] = set()
        for sub in ("records", "failures"):
            for p in self._parts(sub):
                out.update(pq.read_table(p, columns=["example_id"]).column("example_id").to_pylist())
        return out

    def failures(self) -> pd.DataFrame:
        parts = [pq.read_table(p).to_pandas() for p in self._parts("failures")]
        if not parts:
            return pd.DataFrame(columns=["example_id", "reason"])
        return pd.concat(parts).drop_duplicates("example_id").sort_values("example_id").reset_index(drop=True)

    def records(self) -> Shard:
        """All records, one row per example id (sorted), with their arrays aligned."""
        frames, arrays = [], {}
        for p in self._parts("records"):
            df = pq.read_table(p).to_pandas()
            frames.append(df)
            tensors = p.with_suffix(".safetensors")
            if tensors.exists():
                for k, v in load_file(str(tensors)).items():
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
        _atomic_write(self.path / "tables" / f"{name}.csv", lambda p: df.to_csv(p, index=False))
        table = pa.Table.from_pandas(df, preserve_index=False)
        _atomic_write(self.path / "tables" / f"{name}.parquet", lambda p: pq.write_table(table, p))

    def tables(self) -> dict[str, pd.DataFrame]:
        return {p.stem: pq.read_table(p).to_pandas() for p in sorted((self.path / "tables").glob("*.parquet"))}

    def figure_path(self, name: str, ext: str) -> Path:
        return self.path / "figures" / f"{name}.{ext}"
