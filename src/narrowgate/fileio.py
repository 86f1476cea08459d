"""Files written whole or not at all, and safetensors files checked against their own header.

`atomic_write` writes to a temporary name beside the target and renames it into place, removing the
temporary file when writing fails (a full disk leaves the old file, or none, never half a file).
`safetensors_header` reads a safetensors header and checks it against the file without reading the
tensors: the header is a flat JSON object of tensors with a known dtype, a shape and byte offsets
that match that shape, laid end to end, and the file is exactly as long as they say. Nothing here
imports torch.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path

#: Bytes per element of each safetensors dtype.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
#: A header above this size is not a checkpoint's (safetensors itself refuses headers over 100 MB).
MAX_HEADER = 100_000_000


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path``; on any error the
    temporary file is removed and the error raised (``path`` keeps its previous content, if any). An
    `OSError` of the machine (a full disk...) is raised naming ``path``, whatever library wrote it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None and not e.filename:
            raise OSError(e.errno, os.strerror(e.errno), str(path)) from e
        raise


class BadSafetensors(ValueError):
    """A safetensors file is truncated, or its header is damaged or impossible; the message says how."""


def safetensors_header(path: str | os.PathLike) -> tuple[bytes, dict]:
    """The raw JSON header of a safetensors file and its parsed tensors (``__metadata__`` left out).

    Raises `BadSafetensors` for a file shorter than its header says, a header that is not a flat JSON
    object (e.g. nested thousands deep), a tensor whose shape is not a list of whole numbers or whose
    byte offsets do not match its shape or overlap another tensor's, or a file whose length is not
    exactly the header's plus the tensors'.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or 8 + n > size or n > MAX_HEADER:
            raise BadSafetensors(f"{path} is truncated or not a safetensors file ({size} bytes)")
        header = f.read(n)
    try:
        tensors = json.loads(header)
    except (ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise BadSafetensors(f"{path} has a damaged safetensors header (not JSON: {reason})") from None
    if not isinstance(tensors, dict):
        raise BadSafetensors(f"{path} has a damaged safetensors header (not a JSON object)")
    tensors = {k: v for k, v in tensors.items() if k != "__metadata__"}
    spans = []
    for name, t in tensors.items():
        problem = _tensor_problem(t)
        if problem:
            raise BadSafetensors(f"{path}: tensor {name[:60]!r} {problem}")
        spans.append((t["data_offsets"][0], t["data_offsets"][1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            what = "overlaps the one before it" if start < end else "leaves a gap before it"
            raise BadSafetensors(f"{path}: tensor {name[:60]!r} {what} (offset {start}, expected {end})")
        end = stop
    if 8 + n + end != size:
        raise BadSafetensors(f"{path} is truncated: {size} bytes, its header says {8 + n + end}")
    return header, tensors


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _tensor_problem(t) -> str | None:
    """Why one header entry cannot describe a tensor, or None (a dtype newer than `DTYPE_BYTES`, e.g. a
    sub-byte one, is checked for everything but its byte count)."""
    if not isinstance(t, dict):
        return "is not described by a JSON object"
    dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
    if not isinstance(dtype, str):
        return f"has no dtype name ({str(dtype)[:20]})"
    if not isinstance(shape, list) or not all(_whole(d) for d in shape):
        return f"has an impossible shape {str(shape)[:40]}"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(o) for o in offsets):
        return f"has impossible data_offsets {str(offsets)[:40]}"
    if offsets[1] < offsets[0]:
        return f"has data_offsets {offsets} that end before they start"
    if dtype in DTYPE_BYTES and offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
        return (
            f"declares shape {shape} of {dtype} ({math.prod(shape) * DTYPE_BYTES[dtype]} bytes) but "
            f"{offsets[1] - offsets[0]} bytes of data"
        )
    return None
