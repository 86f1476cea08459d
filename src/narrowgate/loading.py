"""`load`: a supported VLM from a hub id or a local checkpoint directory, exactly as users have it.

Also `resolve` (the shipped organisms by name) and `fingerprint` (what identifies a checkpoint's
weights, read from file headers only), which the runner records so a resumed run uses the same model.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from . import checkpoint_prompts, fileio
from .errors import NarrowgateError, OptionError
from .families import UnsupportedModelError, detect, supported
from .vlm import VLM

if TYPE_CHECKING:
    from transformers import PreTrainedConfig
    from transformers.models.auto.auto_factory import _BaseAutoModelClass


class LoadError(NarrowgateError, RuntimeError):
    """A checkpoint could not be loaded; the message names the problem and the fix."""


#: The shipped organisms loadable by name (`narrowgate.organisms.KINDS`, kept here so naming one imports no torch).
ORGANISMS = ("native", "non-native", "gated")
#: Where their checkpoints ship (`narrowgate.organisms.path`): known here, so loading never imports the organisms'
#: training code (which sits above it).
ORGANISM_CHECKPOINTS = Path(__file__).parent / "organisms" / "checkpoints"
#: Seconds to wait for the hub before calling it unreachable (huggingface_hub itself retries a missing file ~40 s).
HUB_TIMEOUT = 3.0
#: Files that define a checkpoint's model (weights, their index, the config); the processor's do not.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SAMPLE = 1 << 16


def resolve(name_or_path: str | os.PathLike) -> str:
    """The checkpoint a user means: a shipped organism's name (``native``, ``non-native``, ``gated``) becomes its
    directory unless a checkpoint of that name (a directory holding config.json) exists here, so a run directory
    named after the organism (``--out native``) never stands for it; anything else is returned unchanged."""
    name = str(name_or_path)
    if name in ORGANISMS and not (Path(name) / "config.json").is_file():
        return str(ORGANISM_CHECKPOINTS / name)
    return name


def safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file, after checking it against the file (`fileio.safetensors_header`)."""
    try:
        return fileio.safetensors_header(path)[0]
    except fileio.BadSafetensors as e:
        raise LoadError(f"{e}: download or save it again.") from None


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


#: A device map as accelerate takes it: "auto", a device, or module name -> device ("disk" and "cpu" included).
DeviceMap = str | int | torch.device | dict[str, Any]


def _gpus_named(device_map: DeviceMap) -> list[int]:
    """The CUDA device indices a device map names (``cuda`` alone is GPU 0; an integer is a GPU index)."""
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    out = []
    for v in values:
        text = str(v).strip()
        if isinstance(v, int) and not isinstance(v, bool) or text.isdigit():
            out.append(int(text))
        elif text == "cuda" or text.startswith("cuda:"):
            index = text.partition(":")[2] or "0"
            out.append(int(index) if index.isdigit() else -1)
    return out


def check_device_map(device_map: DeviceMap | None, option: str = "--device-map") -> None:
    """Refuse a device map naming a GPU this machine does not have, before anything loads or is written."""
    if device_map is None:
        return
    gpus = _gpus_named(device_map)
    if not gpus:
        return
    shown = json.dumps(device_map) if isinstance(device_map, dict) else device_map
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have == 0:
        raise OptionError(
            f"{option} {shown} names a GPU, but torch sees none on this machine (torch.cuda.is_available() is "
            f"False): leave {option} out to run on the CPU, or run where a GPU is visible."
        )
    bad = sorted({g for g in gpus if not 0 <= g < have})
    if bad:
        raise OptionError(f"{option} {shown} names GPU {bad[0]}, but this machine has {have} (0..{have - 1}).")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or name.count("/") > 1


def check_hub(name: str, revision: str | None = None) -> None:
    """Refuse at once a hub id that is not in the local cache when the hub cannot be reached.

    Without this, huggingface_hub retries a file it has no local copy of for about 40 s before failing.
    A cached id, or a hub that answers (even with an error of its own, such as an unknown id), passes.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    try:
        if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
            return
    except ValueError:  # not a valid hub id: transformers names the problem
        return
    fix = f"download it where there is network (`hf download {name} --local-dir DIR`) and give DIR instead of the id"
    if constants.is_offline_mode():
        raise LoadError(
            f"{name!r} is not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE): {fix}."
        )
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json", revision=revision), timeout=HUB_TIMEOUT)
    except HfHubHTTPError:
        return  # the hub answered
    except Exception as e:  # any transport failure (DNS, refused, timeout, proxy) means unreachable
        reason = " ".join(str(e).split()) or type(e).__name__
        raise LoadError(
            f"{name!r} is not in the local Hugging Face cache and the hub cannot be reached ({reason}): {fix}."
        ) from e


def _has_torchvision() -> bool:
    from .compat import is_torchvision_available

    return is_torchvision_available()


def _supports_sdpa(auto: type[_BaseAutoModelClass], config: PreTrainedConfig) -> bool:
    """Whether the class ``auto`` maps ``config`` to runs SDPA (True where it maps none)."""
    try:
        return bool(getattr(auto._model_mapping[type(config)], "_supports_sdpa", True))  # type: ignore[index]  # None only on the abstract base; every Auto class sets it
    except KeyError:
        return True


def _attention(config: PreTrainedConfig, attn_implementation: str) -> str | dict[str, str]:
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


def load(  # noqa: C901  # one check per argument and loading path, each a clear error
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device_map: DeviceMap | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> VLM:
    """Load processor and model with `AutoProcessor` / `AutoModelForImageTextToText` and wrap them.

    ``dtype`` is "auto", a torch dtype or its name ("bfloat16"); ``device_map`` and
    ``max_memory`` go to accelerate (e.g. "auto", or a dict of module -> device, "disk" included).
    A checkpoint directory's ``narrowgate.json`` (its own prompts, `narrowgate.checkpoint_prompts`) is
    validated first and kept as ``VLM.checkpoint_prompts``.
    """
    name = resolve(name_or_path)
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise LoadError(f"{name} is a file; give the checkpoint directory (the one holding config.json).")
    if not path.exists() and (_looks_like_path(name) or isinstance(name_or_path, os.PathLike)):
        raise LoadError(f"Checkpoint directory {name} does not exist.")
    own_prompts = None
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LoadError(f"{name} has no config.json: it is not a Hugging Face checkpoint directory.")
        name = str(path)
        own_prompts = checkpoint_prompts.read(path)
        for weights in sorted(path.glob("*.safetensors")):
            safetensors_header(weights)
    else:
        check_hub(name, revision)
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
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation=_attention(config, attn_implementation), **hub)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    try:
        model = model_cls.from_pretrained(name, **kwargs)
    except (pickle.UnpicklingError, EOFError) as e:
        bins = sorted(p.name for p in path.glob("*.bin")) if path.is_dir() else []
        raise LoadError(
            f"The weights of {name} ({', '.join(bins) or 'a pickle file'}) are a pickle that torch refuses to load "
            f"safely ({type(e).__name__}: {' '.join(str(e).split())[:80]}...): use the checkpoint's safetensors "
            "version, or convert it where you trust its origin (model.save_pretrained(DIR, safe_serialization=True))."
        ) from None
    except (OSError, ValueError) as e:
        raise LoadError(f"Could not load the {family.name} model from {name!r}: {e}") from e
    return VLM(model, processor, checkpoint_prompts=own_prompts)


__all__ = ["LoadError", "check_device_map", "fingerprint", "load", "resolve", "supported"]
