"""Model organisms: two small VLMs trained in-repo that mirror the paper's native / non-native contrast.

``native``: a stock Chameleon trained from scratch with next-token loss on image and text tokens,
images written as discrete codes of a learned VQ tokenizer in the text vocabulary, closed by the
end-of-image token ``<eoss>`` (the paper's early-fusion, multimodal-output models).
``non-native``: a stock LLaVA built from a text-pretrained Llama and a contrastively (CLIP)
text-aligned vision tower, tuned with loss on text only (the paper's text-output models).

Both read the experiments' prompts on synthetic scenes (`narrowgate.data.synthetic`). The
shipped checkpoints are in `path(kind)`; `train` reproduces them from the seed.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint_prompts
from ..errors import OptionError
from ..loading import ORGANISM_CHECKPOINTS
from . import card as cardlib
from . import gated, native, non_native
from .common import PROMPTS
from .heldout import evaluate

KINDS = ("native", "non-native", "gated")
_MODULES = {"native": native, "non-native": non_native, "gated": gated}
#: A recipe's config, one dataclass per kind.
_Config = native.NativeConfig | non_native.NonNativeConfig | gated.GatedConfig
_DEFAULTS: dict[str, _Config] = {
    "native": native.NativeConfig(),
    "non-native": non_native.NonNativeConfig(),
    "gated": gated.GatedConfig(),
}
_TINY: dict[str, _Config] = {"native": native.TINY, "non-native": non_native.TINY, "gated": gated.TINY}


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"Unknown organism {kind!r}; choose one of {', '.join(KINDS)}.")


def path(kind: str) -> Path:
    """The shipped checkpoint directory of ``kind`` (load it with ``narrowgate.load(path(kind))``)."""
    _check(kind)
    return ORGANISM_CHECKPOINTS / kind


def config(kind: str, *, tiny: bool = False, **overrides: Any) -> _Config:
    """The recipe's config of ``kind`` (``tiny``: a seconds-long version for tests), with overrides."""
    _check(kind)
    return dataclasses.replace(_TINY[kind] if tiny else _DEFAULTS[kind], **overrides)


def train(
    kind: str,
    out_dir,
    *,
    seed: int = 0,
    progress: bool = True,
    tiny: bool = False,
    overrides: dict | None = None,
    heldout: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Train organism ``kind`` from ``seed``, save it to ``out_dir`` with its card and its prompts
    (``narrowgate.json``, `common.PROMPTS`); return the card.

    Training is deterministic (2 CPU threads, deterministic algorithms): the same seed, versions and
    machine give the same weights.

    ``tiny`` and ``overrides`` (config fields, e.g. ``{"steps": 100}`` for the main phase) shrink the
    run, e.g. for tests. ``heldout`` sets the
    held-out evaluation sizes (``{"vqa": 300, "captions": 100, "classes": 20}``; ``{}`` to skip it).
    ``out_dir`` must be a new or empty folder unless ``overwrite`` (checked before training starts).
    """
    _check(kind)
    cfg = config(kind, tiny=tiny, **(overrides or {}))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {out} is a file, not a folder: give a folder for the checkpoint.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a checkpoint" if (out / "config.json").exists() else "files"
        raise OptionError(
            f"--out {out} already holds {what}; training would overwrite it. Give another --out, or --force to "
            "overwrite it."
        )
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    module = _MODULES[kind]
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # CPU convolution backward is not bit-reproducible otherwise
    try:
        info = module.train(out, seed=seed, config=cfg, progress=progress)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    seconds = time.perf_counter() - start
    checkpoint_prompts.write(out, PROMPTS)
    scores = evaluate(out, sizes=heldout) if heldout != {} else None
    recipe = module.recipe(cfg) if hasattr(module, "recipe") else module.RECIPE
    card = cardlib.make_card(kind, recipe, info, scores, seed=seed, seconds=seconds, out_dir=out)
    cardlib.write_card(out, card)
    return card


__all__ = ["KINDS", "config", "evaluate", "path", "train"]
