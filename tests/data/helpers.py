"""Helpers that write tiny datasets in their real on-disk formats."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

CORRUPT_BYTES = b"this is not a JPEG at all\x00\xff\xd8garbage"


def jpeg_bytes(color=(200, 30, 30), size=(12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_jpeg(path: Path, color=(200, 30, 30), size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(color, size))
    return path


def write_json(path: Path, doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def require_pyarrow():
    """pyarrow and pyarrow.parquet, or skip (pyarrow can be installed yet fail to import, e.g. against an old numpy)."""
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet
    except ImportError as exc:
        pytest.skip(f"pyarrow is not usable here: {exc}")
    return pyarrow, pyarrow.parquet
