"""The option syntax shared by the API and the CLI: counts, layer sets, image sizes, memory sizes.

Each parser turns what a user wrote into a value or raises one `narrowgate.errors.OptionError` naming the
option and the fix. Like `narrowgate.errors`, this module imports nothing heavy (the CLI parses options
before torch loads).
"""

from __future__ import annotations

import numbers
import re
from collections import Counter

from .errors import OptionError

#: What ``--model`` (``narrowgate run``, ``finetune``, ``compare``...) accepts, said once for every command.
MODEL_HELP = "Hub id, checkpoint directory, or a shipped organism: native, non-native, gated."


def check_count(value: object, option: str) -> None:
    """Refuse a count below 1 or not a whole number (``--n 0`` is not "the default"), naming ``option``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
        raise OptionError(f"{option} must be a whole number of at least 1, got {value!r}.")


#: No decoder has this many layers; larger numbers are typos (and would expand into huge ranges).
MAX_LAYERS = 10_000

_LAYER_ITEM = re.compile(r"([0-9]+)(?:-([0-9]+))?", re.ASCII)


def parse_layer_set(text: str, option: str = "--layers") -> tuple[int, ...]:
    """``'0-31'``, ``'3,5,7'`` or ``'0-3,8'`` -> the decoder layers, in the order written.

    Items are non-negative integers or ascending ranges ``a-b`` (both ends included), separated by
    commas; spaces around an item are ignored. Anything else (an empty set, ``5-2``, ``2-``,
    ``-1``, a layer named twice) raises `OptionError` naming ``option``: a knockout over a
    layer set the user did not mean would silently measure something else.
    """
    if not isinstance(text, str) or not text.strip():
        raise OptionError(f"{option} {text!r} names no layer; write e.g. '0-31' or '3,5,7'.")
    out: list[int] = []
    for item in text.split(","):
        m = _LAYER_ITEM.fullmatch(item.strip())
        if not m:
            raise OptionError(
                f"{option} {text!r}: {item.strip()!r} is not a layer or an a-b range; write e.g. '0-31' or '3,5,7'."
            )
        a, b = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if b < a:
            raise OptionError(f"{option} {text!r}: range {a}-{b} is empty (it must ascend, e.g. {b}-{a}).")
        if b >= MAX_LAYERS:
            raise OptionError(f"{option} {text!r}: layer {b} is beyond any model (at most {MAX_LAYERS - 1}).")
        out += range(a, b + 1)
    twice = sorted(x for x, times in Counter(out).items() if times > 1)
    if twice:
        raise OptionError(f"{option} {text!r} names layer(s) {twice} more than once.")
    return tuple(out)


def parse_image_size(text: object) -> tuple[int, int] | None:
    """``'WxH'`` -> (width, height) in pixels; ``'processor'`` (the processor's own sizing) -> None.

    Raises `OptionError` naming ``--image-size`` for anything else.
    """
    value = str(text).strip().lower()
    if value == "processor":
        return None
    m = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", value)
    if not m or not all(1 <= int(g) <= 16384 for g in m.groups()):
        raise OptionError(
            f"--image-size {text!r} is not WIDTHxHEIGHT in pixels (e.g. 512x512, each 1..16384) or 'processor'."
        )
    return int(m.group(1)), int(m.group(2))


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20}
_UNITS.update({"g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40})


def parse_size(value: object, option: str = "--memory-budget") -> int | None:
    """``'8GiB'``, ``'512 MB'``, ``'1.5g'`` or a number of bytes -> bytes; None (or ``'auto'``) -> None.

    Raises `OptionError` naming ``option`` for anything else, or for less than 1 MiB."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number) :]
    try:
        out = int(float(number) * _UNITS[unit])
    except (ValueError, KeyError, OverflowError):
        raise OptionError(f"{option} {value!r}: write a size such as 8GiB, 512MiB or 2GB (or auto).") from None
    if out < 1 << 20:
        raise OptionError(f"{option} {value!r} is below 1 MiB; no model call fits in it.")
    return out
