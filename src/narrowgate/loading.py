"""`load`: a supported VLM from a hub id or a local checkpoint directory, exactly as users have it.

Also `resolve` (the shipped organisms by name) and `fingerprint` (what identifies a checkpoint's
weights, read from file headers only), which the runner records so a resumed run uses the same model.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .errors import NarrowgateError
from .families import UnsupportedModelError, detect, supported
from .vlm import VLM


class LoadError(NarrowgateError, RuntimeError):
    """A checkpoint could not be loaded; the message names the problem and the fix."""


ORGANISMS = ("native", "non-native")
#: Files that define a checkpoint's model (weights, their index, the config); the processor's do not.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SAMPLE = 1 << 16


def resolve(name_or_path: str | os.PathLike) -> str:
    """The checkpoint a user means: a shipped organism's name (``native``, ``non-native``) becomes its
    directory unless a directory of that name exists here; anything else is returned unchanged."""
    name = str(name_or_path)
    if name in ORGANISMS and not Path(name).exists():
        from .organisms import path

        return str(path(name))
    return name


def safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file, after checking that the file is as long as it says."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or 8 + n > size:
            raise LoadError(f"{path} is truncated or not a safetensors file ({size} bytes): download or save it again.")
        header = f.read(n)
    try:
        tensors = json.loads(header)
        end = max((t["data_offsets"][1] for k, t in tensors.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise LoadError(f"{path} has a damaged safetensors header ({e}): download or save it again.") from e
    if 8 + n + end != size:
        raise LoadError(f"{path} is truncated: {size} bytes, its header says {8 + n + end}. Download or save it again.")
    return header


def fingerprint(name_or_path: str | os.PathLike, revision: str | None = None) -> dict:
    """What identifies a checkpoint's weights, read cheaply (never the whole file).

    A hub id: the id and the revision (a commit hash is immutable). A directory: for config.json and
    every weight file, its size and a SHA-256 of its safetensors header (or, for other files, of the
    whole config / index) plus of three 64 KiB samples at the start, middle and end, so a checkpoint
    replaced under the same path by one of the same shapes still differs.
    """
    name = resolve(name_or_path)
    path = Path(name).expanduser()
    if not path.is_dir():
        return {"hub": name, "revision": revision}
    files = {}
    for f in sorted(path.iterdir()):
        if not (f.name == "config.json" or f.suffix in _WEIGHT_SUFFIXES or f.name.endswith(".index.json")):
            continue
        size = f.stat().st_size
        entry: dict = {"size": size}
        digest = hashlib.sha256()
        if f.suffix == ".safetensors":
            entry["header_sha256"] = hashlib.sha256(safetensors_header(f)).hexdigest()
        if f.suffix == ".json":
            digest.update(f.read_bytes())
        else:
            with open(f, "rb") as fh:
                for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                    fh.seek(offset)
                    digest.update(fh.read(_SAMPLE))
        entry["sha256" if f.suffix == ".json" else "sample_sha256"] = digest.hexdigest()
        files[f.name] = entry
    return {"files": files}


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or name.count("/") > 1


def _has_torchvision() -> bool:
    from .compat import is_torchvision_available

    return is_torchvision_available()


def _supports_sdpa(auto, config) -> bool:
    """Whether the class ``auto`` maps ``config`` to runs SDPA (True where it maps none)."""
    try:
        return bool(getattr(auto._model_mapping[type(config)], "_supports_sdpa", True))
    except KeyError:
        return True


def _attention(config, attn_implementation: str) -> str | dict[str, str]:
    """What to load with for ``attn_implementation``. The language model is what the engine routes: where the
    model class as a whole refuses SDPA because another part has none (GOT-OCR 2's SAM vision tower), SDPA goes to
    the language model alone; where the language model itself has none (HunYuan-V4-VL's), it gets eager attention,
    which the engine routes as exactly. The rest keeps transformers' default."""
    text = getattr(config, "text_config", None)
    if attn_implementation != "sdpa" or text is None or "text_config" not in config.sub_configs:
        return attn_implementation
    text_sdpa = _supports_sdpa(AutoModel, text)
    if text_sdpa and _supports_sdpa(AutoModelForImageTextToText, config):
        return attn_implementation
    return {"text_config": "sdpa" if text_sdpa else "eager"}


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
    name = resolve(name_or_path)
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise LoadError(f"{name} is a file; give the checkpoint directory (the one holding config.json).")
    if not path.exists() and (_looks_like_path(name) or isinstance(name_or_path, os.PathLike)):
        raise LoadError(f"Checkpoint directory {name} does not exist.")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LoadError(f"{name} has no config.json: it is not a Hugging Face checkpoint directory.")
        name = str(path)
        for weights in sorted(path.glob("*.safetensors")):
            safetensors_header(weights)
    hub = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(name, **hub)
    except (OSError, ValueError) as e:
        if path.is_dir():
            raise LoadError(f"Could not read {path / 'config.json'}: {e}") from e
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
    model_cls = AutoModelForImageTextToText
    kwargs = dict(dtype=dtype, attn_implementation=_attention(config, attn_implementation), **hub)
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


__all__ = ["LoadError", "fingerprint", "load", "resolve", "supported"]
