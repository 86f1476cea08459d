"""Files written whole or not at all, and safetensors headers checked against their file (issue 23)."""

from __future__ import annotations

import errno
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from narrowgate.fileio import BadSafetensors, atomic_write, safetensors_header


def test_atomic_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")

    def half_then_full_disk(tmp):
        tmp.write_text("ne")
        raise OSError(errno.ENOSPC, "disk full")

    with pytest.raises(OSError) as err:
        atomic_write(target, half_then_full_disk)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["table.csv"]
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def _file(tmp_path, header: dict, data: bytes) -> str:
    raw = json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def test_a_file_safetensors_wrote_is_accepted_with_its_tensors(tmp_path):
    save_file({"a": np.zeros((2, 3), np.float32), "b": np.ones(5, np.int64)}, str(tmp_path / "ok.safetensors"))
    _, tensors = safetensors_header(tmp_path / "ok.safetensors")
    assert {k: (t["dtype"], t["shape"]) for k, t in tensors.items()} == {"a": ("F32", [2, 3]), "b": ("I64", [5])}


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 7, "is truncated"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "declares shape \\[3\\] of F32"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "impossible shape"),
        ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, b"\0" * 8, "impossible shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "end before they start"),
        (
            {
                "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
            },
            b"\0" * 6,
            "overlaps the one before it",
        ),
        ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"\0" * 6, "leaves a gap"),
        ({"a": [1, 2]}, b"", "is not described by a JSON object"),
    ],
)
def test_impossible_headers_are_refused(tmp_path, header, data, message):
    with pytest.raises(BadSafetensors, match=message):
        safetensors_header(_file(tmp_path, header, data))


def test_a_header_that_is_not_a_flat_object_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    for raw, message in ((b"[" * 100_000 + b"]" * 100_000, "nested too deeply"), (b"[1]", "not a JSON object")):
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
        with pytest.raises(BadSafetensors, match=message):
            safetensors_header(path)
    path.write_bytes(b"\xff" * 8)
    with pytest.raises(BadSafetensors, match="truncated or not a safetensors file"):
        safetensors_header(path)
