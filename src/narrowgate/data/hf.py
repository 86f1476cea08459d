"""Read a Hugging Face ``datasets`` layout from disk with pyarrow alone (``datasets`` is not needed).

Supported: a directory written by ``save_to_disk`` (a single dataset, or a ``DatasetDict`` with
one subdirectory per split; Arrow IPC stream shards), a directory of Parquet shards as found in
a downloaded hub repository, or a single ``.parquet``/``.arrow`` file. Metadata columns are read
up front; the image column is read later, only for the rows an experiment actually uses.
"""

from __future__ import annotations

import os
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import DataError, DataMissing
from .base import describe, image_in, image_of, read_json


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(
            "reading Hugging Face dataset files needs a working pyarrow (pip install pyarrow); "
            f"importing it failed: {exc}"
        ) from exc
    return pa, pq


def _split_matches(relative: Path, split: str) -> bool:
    name = relative.name
    return split in relative.parts[:-1] or name.startswith(f"{split}-") or name.split(".")[0] == split


def find_shards(path: str | Path, split: str | None = None) -> list[Path]:
    """The data files of ``split`` under ``path``, in a fixed (sorted) order.

    ``split=None`` takes the only split of a ``DatasetDict`` (and is an error when there are
    several) or every file of a plain directory.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataMissing(f"no dataset at {path}")
    dict_file = path / "dataset_dict.json"
    if dict_file.is_file():
        doc = read_json(dict_file)
        splits = doc.get("splits") if isinstance(doc, dict) else None
        if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
            raise DataError(f"{dict_file} is not a datasets DatasetDict file: expected a list of split names.")
        if split is None:
            if len(splits) != 1:
                raise DataError(f"{path} holds splits {splits}; choose one with split=")
            split = splits[0]
        if split not in splits:
            raise DataError(f"split {split!r} not in {path} (it has {splits})")
        return find_shards(image_in(path, split, dict_file))
    state_file = path / "state.json"
    if state_file.is_file():
        doc = read_json(state_file)
        files = doc.get("_data_files") if isinstance(doc, dict) else None
        names = [e.get("filename") if isinstance(e, dict) else None for e in files or ()]
        if not isinstance(files, list) or not all(isinstance(n, str) and n for n in names):
            raise DataError(f"{state_file} is not a datasets state file: expected '_data_files' naming its shards.")
        return [image_in(path, str(name), state_file) for name in names]  # every name a string (checked above)
    files = sorted(path.rglob("*.parquet")) or sorted(path.rglob("*.arrow"))
    if split is not None:
        files = [f for f in files if _split_matches(f.relative_to(path), split)]
    if not files:
        raise DataMissing(f"no Parquet or Arrow files{f' for split {split!r}' if split else ''} under {path}")
    return files


def _read_arrow(path: Path):
    pa, _ = _pyarrow()
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


@contextmanager
def _readable(shard: Path):
    """Turn pyarrow's error on a damaged or foreign shard into a `DataError` naming the file."""
    pa, _ = _pyarrow()
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise DataMissing(f"{shard} is missing: {e}") from None
        detail = " ".join(str(e).split())[:200]
        raise DataError(
            f"{shard} is not a readable Parquet/Arrow file ({detail}): copy or download it again."
        ) from None


class HFTable:
    """The rows of one split, with the image column fetched separately for chosen rows."""

    def __init__(self, path: str | Path, split: str | None = None, image_column: str = "image"):
        self.root = Path(path)
        self.split = split
        self.image_column = image_column
        self.shards = find_shards(path, split)

    def rows(self) -> list[dict[str, Any]]:
        """Every row as a dict of its non-image columns, plus ``_ref`` = (shard index, row in shard)."""
        _, pq = _pyarrow()
        out: list[dict[str, Any]] = []
        for i, shard in enumerate(self.shards):
            with _readable(shard):
                if shard.suffix == ".parquet":
                    names = pq.ParquetFile(shard).schema_arrow.names
                    table = pq.read_table(shard, columns=[c for c in names if c != self.image_column])
                else:
                    table = _read_arrow(shard)
                    if self.image_column in table.column_names:
                        table = table.drop_columns([self.image_column])
                rows = table.to_pylist()
            for j, row in enumerate(rows):
                row["_ref"] = (i, j)
                out.append(row)
        return out

    def images(self, refs: list[tuple[int, int]]) -> dict[tuple[int, int], Any]:
        """The raw image-column value of each row in ``refs`` (None where the column is absent)."""
        _, pq = _pyarrow()
        by_shard: dict[int, list[int]] = defaultdict(list)
        for shard, row in refs:
            by_shard[shard].append(row)
        out: dict[tuple[int, int], Any] = {}
        for i, rows in by_shard.items():
            with _readable(self.shards[i]):
                out.update(self._images_of(i, rows))
        return out

    def _images_of(self, i: int, rows: list[int]) -> dict[tuple[int, int], Any]:
        """The image-column values of ``rows`` of shard ``i``, reading only the row groups that hold them."""
        _, pq = _pyarrow()
        shard = self.shards[i]
        if shard.suffix != ".parquet":
            table = _read_arrow(shard)
            if self.image_column not in table.column_names:
                return {(i, r): None for r in rows}
            return dict(zip(((i, r) for r in rows), table.column(self.image_column).take(rows).to_pylist()))
        pf = pq.ParquetFile(shard)
        if self.image_column not in pf.schema_arrow.names:
            return {(i, r): None for r in rows}
        starts, start = [], 0
        for g in range(pf.num_row_groups):
            starts.append(start)
            start += pf.metadata.row_group(g).num_rows
        wanted: dict[int, list[int]] = defaultdict(list)
        for r in rows:
            wanted[max(k for k, s in enumerate(starts) if s <= r)].append(r)
        out: dict[tuple[int, int], Any] = {}
        for g, group_rows in wanted.items():
            column = pf.read_row_group(g, columns=[self.image_column]).column(0)
            values = column.take([r - starts[g] for r in group_rows]).to_pylist()
            out.update({(i, r): v for r, v in zip(group_rows, values)})
        return out

    def image_source(self, value: Any) -> dict[str, Any]:
        """Keyword arguments for `Example` (``image_bytes`` or ``image_path``, or the ``defect`` that there is no
        usable image) from an image-column value. A path must lie inside the dataset folder (`image_of`)."""
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            data, path = value, None
        else:
            data, path = None, value
        if isinstance(data, (bytes, bytearray)):
            return {"image_bytes": bytes(data)}
        if isinstance(path, str) and path:
            root = self.root if self.root.is_dir() else self.root.parent
            image_path, reason = image_of(root, _relative_to(path, root))
            return {"image_path": image_path} if reason is None else {"defect": reason}
        if value is None:
            return {"defect": "no image source"}
        return {"defect": f"the {self.image_column!r} column holds {describe(value)}, not an image"}


def _relative_to(path: str, root: Path) -> str:
    """``path`` relative to ``root`` when it is an absolute path inside it (as ``save_to_disk`` may store them);
    any other absolute path is returned as it is, for `image_of` to refuse."""
    if not path.startswith("/"):
        return path
    absolute = os.path.abspath(root)
    inside = os.path.normpath(path) == path and path.startswith(absolute.rstrip("/") + "/")
    return path[len(absolute.rstrip("/")) + 1 :] if inside else path
