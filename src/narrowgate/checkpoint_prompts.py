"""``narrowgate.json``: the prompts a checkpoint was trained to answer, kept beside its ``config.json``.

A model answers the prompts it learnt; a family preset (e.g. Chameleon's VQA prompt ending in
" Answer:") is right for the published checkpoints and wrong for a model trained on other prompts,
such as the shipped organisms. A checkpoint directory can therefore say which prompts it answers::

    {
      "narrowgate_format": 1,
      "prompts": {
        "vqa": "{question}\\nAnswer the question using a single word or phrase.",
        "captions": "Provide a one-sentence caption for the provided image.",
        "class": "This shape is a"
      }
    }

Each prompt is a string, or an object mapping a dataset name (``imagenet``, ``synthetic``...) to a
string for prompts that differ per dataset. ``class_patching`` falls back to ``class``. `read`
validates the whole file and refuses it with one message naming the field and the fix; `load`
attaches what it read to the `VLM`, and every command resolves its prompts as: an explicit option,
then ``narrowgate.json``, then the family preset (`narrowgate.data.prompts.resolve`).
This module imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from pathlib import Path

from .errors import NarrowgateError

FILENAME = "narrowgate.json"
#: The format this narrowgate writes and reads; a file of a later format is refused (upgrade narrowgate).
FORMAT = 1
#: Prompt kinds a checkpoint can set (the keys of `narrowgate.data.prompts.KEYS`).
KINDS = ("vqa", "captions", "class", "class_patching")
DATASETS = ("vqav2", "coco", "flickr30k", "imagenet", "synthetic")


class CheckpointPromptsError(NarrowgateError, ValueError):
    """A ``narrowgate.json`` that cannot be used; the message names the field and the fix."""


@dataclass(frozen=True)
class CheckpointPrompts:
    """The validated content of a ``narrowgate.json`` and where it was read from."""

    prompts: dict
    path: str | None = None

    def get(self, kind: str, dataset: str | None) -> str | None:
        """The checkpoint's prompt of ``kind`` for ``dataset``, or None when it sets none."""
        for k in (kind, "class") if kind == "class_patching" else (kind,):
            value = self.prompts.get(k)
            if isinstance(value, dict):
                value = value.get(dataset)
            if value is not None:
                return value
        return None

    def as_json(self) -> dict:
        """The file's content as written next to a checkpoint (its format version and the prompts)."""
        return {"narrowgate_format": FORMAT, "prompts": self.prompts}


def _fields(template: str) -> list[str | None]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def _check_text(value, where: str, kind: str) -> str:
    """A non-empty prompt; a VQA template must format with ``question`` alone (others are used as written)."""
    if not isinstance(value, str) or not value.strip():
        raise CheckpointPromptsError(f"{where}: must be a non-empty string, got {value!r}.")
    if kind != "vqa":
        return value
    try:
        names = _fields(value)
    except ValueError as e:
        raise CheckpointPromptsError(
            f"{where}: {value!r} is not a valid template ({e}); write '{{{{' for a brace."
        ) from None
    if names != ["question"]:
        raise CheckpointPromptsError(
            f"{where}: {value!r} must have exactly one {{question}} placeholder; write '{{{{' and '}}}}' for "
            "literal braces."
        )
    return value


def parse(doc, where: str = FILENAME) -> CheckpointPrompts:
    """Validate a ``narrowgate.json`` document; raise `CheckpointPromptsError` naming the first problem."""
    fix = f"fix or delete {where} (see docs/checkpoint-prompts.md)"
    if not isinstance(doc, dict):
        raise CheckpointPromptsError(f"{where} must hold a JSON object, not {type(doc).__name__}; {fix}.")
    version = doc.get("narrowgate_format")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointPromptsError(f"{where} has no integer 'narrowgate_format' (write {FORMAT}); {fix}.")
    if version > FORMAT:
        raise CheckpointPromptsError(
            f"{where} is in format {version}, newer than this narrowgate reads ({FORMAT}): upgrade narrowgate."
        )
    if version < 1:
        raise CheckpointPromptsError(f"{where}: narrowgate_format {version} does not exist (write {FORMAT}); {fix}.")
    unknown = sorted(set(doc) - {"narrowgate_format", "prompts"})
    if unknown:
        raise CheckpointPromptsError(f"{where} has unknown field(s) {unknown}; {fix}.")
    prompts = doc.get("prompts")
    if not isinstance(prompts, dict):
        raise CheckpointPromptsError(f"{where} needs an object 'prompts' (kind -> prompt); {fix}.")
    out: dict = {}
    for kind, value in prompts.items():
        if kind not in KINDS:
            raise CheckpointPromptsError(f"{where}: unknown prompt kind {kind!r} (kinds: {', '.join(KINDS)}); {fix}.")
        if isinstance(value, dict):
            bad = sorted(set(value) - set(DATASETS))
            if bad or not value:
                raise CheckpointPromptsError(
                    f"{where}: prompts.{kind} maps datasets ({', '.join(DATASETS)}) to prompts; "
                    f"{'unknown ' + repr(bad) if bad else 'it is empty'}; {fix}."
                )
            out[kind] = {d: _check_text(t, f"{where}: prompts.{kind}.{d}", kind) for d, t in value.items()}
        else:
            out[kind] = _check_text(value, f"{where}: prompts.{kind}", kind)
    return CheckpointPrompts(out, where)


def read(directory: str | os.PathLike) -> CheckpointPrompts | None:
    """The validated ``narrowgate.json`` of a checkpoint directory, or None when it has none."""
    path = Path(directory) / FILENAME
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointPromptsError(f"{path} is not valid UTF-8 JSON ({e}); fix or delete it.") from e
    except OSError as e:
        raise CheckpointPromptsError(f"{path} cannot be read ({e.strerror}); fix its permissions or delete it.") from e
    return parse(doc, str(path))


def write(directory: str | os.PathLike, prompts: dict) -> Path:
    """Write ``prompts`` (kind -> prompt, validated first) as ``directory/narrowgate.json``."""
    doc = {"narrowgate_format": FORMAT, "prompts": prompts}
    parse(doc, str(Path(directory) / FILENAME))
    path = Path(directory) / FILENAME
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path
