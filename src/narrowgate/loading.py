"""`load`: a supported VLM from a hub id or a local checkpoint directory, exactly as users have it."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from .families import UnsupportedModelError, detect, supported
from .vlm import VLM


class LoadError(RuntimeError):
    """A checkpoint could not be loaded; the message names the problem and the fix."""


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or name.count("/") > 1


def _has_torchvision() -> bool:
    from .compat import is_torchvision_available

    return is_torchvision_available()


def load(
    name_or_path: str | os.PathLike,
    *,
    dtype="auto",
    device_map=None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> VLM:
    """Load processor and model with `AutoProcessor` / `AutoModelForImageTextToText` and wrap them.

    ``dtype`` is "auto", a torch dtype or its name ("bfloat16"); ``device_map`` and
    ``max_memory`` go to accelerate (e.g. "auto", or a dict of module -> device, "disk" included).
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise LoadError(f"{name} is a file; give the checkpoint directory (the one holding config.json).")
    if not path.exists() and (_looks_like_path(name) or isinstance(name_or_path, os.PathLike)):
        raise LoadError(f"Checkpoint directory {name} does not exist.")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LoadError(f"{name} has no config.json: it is not a Hugging Face checkpoint directory.")
        name = str(path)
    hub = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(name, **hub)
    except (OSError, ValueError) as e:
        raise LoadError(
            f"Could not read the config of {name!r}: {e}\n"
            "If this is a hub id, the machine may be offline: download the checkpoint where you have network "
            "(e.g. `huggingface-cli download ID --local-dir DIR`) and pass the directory."
        ) from e
    try:
        family = detect(config)
    except UnsupportedModelError as e:
        raise LoadError(str(e)) from e
    try:
        processor = AutoProcessor.from_pretrained(name, **hub)
    except (OSError, ValueError, TypeError, ImportError) as e:
        if not _has_torchvision():
            raise LoadError(
                f"Could not load the {family.name} processor of {name!r}: {e}\ntransformers' processors for this "
                "family need torchvision: `pip install torchvision` (or `pip install narrowgate[vision]`)."
            ) from e
        raise LoadError(
            f"Could not load a processor for {name!r}: {e}\nThe checkpoint directory needs the processor files "
            "(tokenizer and image processor, as saved by `processor.save_pretrained(DIR)`)."
        ) from e
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise LoadError(
            f"{name!r} has no complete processor (tokenizer + image processor); save one with "
            "`processor.save_pretrained(DIR)`."
        )
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise LoadError(f"Unknown dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'.")
        dtype = getattr(torch, dtype)
    model_cls = family.model_class or AutoModelForImageTextToText
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation, **hub)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    try:
        model = model_cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise LoadError(f"Could not load the {family.name} model from {name!r}: {e}") from e
    return VLM(model, processor)


__all__ = ["LoadError", "load", "supported"]
