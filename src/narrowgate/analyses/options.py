"""Typed settings of a run: the fields every run has (`RunConfig`) and the groups experiments mix in.

Each experiment declares one dataclass of its settings (its defaults are the paper's). A field's
metadata says how the command line shows it — help, option name, minimum, choices, the parser of its
text — so ``narrowgate run EXPERIMENT`` builds its options and its ``--help`` from that class alone.
The Python API takes the same names as a dict. Nothing here imports torch: ``--help`` stays instant.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Protocol

from ..errors import OptionError
from ..parsing import MODEL_HELP, parse_layer_set

DATASETS = ("vqav2", "coco", "flickr30k", "imagenet", "synthetic")
TASKS = ("vqa", "captions", "classes")
MODES = ("zero", "mask")
#: Which way each class pair is patched (patching, steering), and which residual indices a patch covers.
DIRECTIONS = ("paper", "both")
SPANS = ("single", "from")


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    short: str | None = None,
    min: float | None = None,
    max: float | None = None,
    choices: tuple | None = None,
    parse: str | None = None,
    required: bool = False,
    cli: bool = True,
) -> Any:
    """A settings field: ``help``, ``flag`` (default ``--field-name``) and ``short`` (e.g. ``-n``) for the command
    line, ``min``, ``max``
    and ``choices`` checked there, ``parse`` naming a text parser of the CLI (layers, roles, device_map, finite,
    positive, nonempty); ``cli=False`` for settings the Python API alone takes."""
    meta = dict(
        help=help, flag=flag, short=short, min=min, max=max, choices=choices, parse=parse, required=required, cli=cli
    )
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """What every run takes: the model, the data and its sample, where results go, how to run."""

    #: Required (``required=True``): the runner refuses a run without it, so every hook sees a string.
    model: str = option(None, MODEL_HELP, parse="nonempty", required=True)
    data: str = option(
        None, "vqav2, coco, flickr30k, imagenet or synthetic (no files needed).", choices=DATASETS, required=True
    )
    data_dir: str | None = option(None, "Where the dataset's files are on disk.", parse="nonempty")
    n: int | None = option(
        None,
        "Examples to sample (seeded; default 2,000). Under torchrun write -n: torchrun takes --n for its own options.",
        short="-n",
        min=1,
    )
    n_per_class: int | None = option(None, "Images per class for ImageNet/synthetic classes.", min=1)
    out: str | None = option(
        None, "Run directory (default runs/<experiment>-<model>-<time>); rerun to resume.", parse="nonempty"
    )
    batch_size: int = option(1, "Examples per forward (halved automatically on OOM).", min=1)
    dtype: str = option(
        "auto", "auto, float32, bfloat16 or float16.", choices=("auto", "float32", "bfloat16", "float16")
    )
    device_map: str | dict | None = option(
        None, "accelerate device map: auto, balanced, or a JSON dict.", parse="device_map"
    )
    max_memory: dict | None = option(None, "accelerate max_memory per device.", cli=False)
    image_size: str | None = option(
        None,
        "Resize every image to WxH pixels before the processor (e.g. 512x512), or 'processor' for the processor's own "
        "sizing (default: the family's preset, see README).",
        parse="image_size",
    )
    memory_budget: str | None = option(
        None,
        "Working memory one model call may use beyond the weights, e.g. 8GiB; the work is split to fit "
        "(default: what a plain forward of the batch needs). Not --max-memory, which places the weights.",
        parse="size",
    )
    seed: int = option(42, "Sampling seed.", min=0)
    allow_fewer: bool = option(
        False, "Run on fewer examples than asked when the data has fewer (recorded in the manifest)."
    )
    retry_failed: bool = option(
        False, "Process again the examples recorded as failures (e.g. after fixing their images)."
    )
    progress: bool = option(True, "Show a progress bar.", cli=False)


@dataclass
class ClassPrompt:
    """Experiments that read the class prompt."""

    prompt: str | None = option(
        None, "Class prompt (default 'This animal is a' / 'This shape is a').", parse="nonempty"
    )


@dataclass
class TaskPrompts:
    """Experiments that generate answers or captions (or read the class prompt), and score them."""

    task: str | None = option(
        None, "On synthetic data: vqa, captions or classes (real data implies its task).", choices=TASKS
    )
    vqa_prompt: str | None = option(
        None,
        "VQA prompt with {question} (default: the family's preset, see docs/experiments/index.md).",
        parse="nonempty",
    )
    caption_prompt: str | None = option(None, "Caption prompt (default: the paper's).", parse="nonempty")
    max_new_tokens: int | None = option(None, "New tokens to generate (VQA 20, captions 60).", min=1)
    cider_tokenize: str = option(
        "ptb", "ptb (official COCO tokenisation) or raw (the authors' raw strings).", choices=("ptb", "raw")
    )


@dataclass
class PaperAxis:
    """Experiments whose figures reproduce one of the paper's per-layer figures."""

    axis: str = option(
        "paper",
        "Figure x axis: paper (layer l = the output of decoder layer l = resid l+1, as the paper's and the authors' "
        "figures) or resid (residual index 0..L, embeddings included).",
        choices=("paper", "resid"),
    )


@dataclass
class PairsConfig(ClassPrompt, RunConfig):
    """Patching and steering: images per pair class, and which way each pair is patched."""

    n: int | None = option(None, "Not used: pairs sample per class (give --n-per-class).", cli=False)
    n_per_class: int | None = option(100, "Images per pair class (the paper: 100).", min=1)
    direction: str = option("paper", "paper (base <- target as published) or both.", choices=DIRECTIONS)


def names(config: type) -> tuple[str, ...]:
    """The names of ``config``'s settings, in declaration order."""
    return tuple(f.name for f in fields(config))


def defaults(config: type) -> dict:
    """The fields whose default is a value (None means "decided by the run": data, family or task)."""
    out = {}
    for f in fields(config):
        if f.default is not MISSING:
            value = f.default
        elif f.default_factory is not MISSING:
            value = f.default_factory()
        else:
            raise TypeError(f"{config.__name__}.{f.name} has no default: every setting needs one.")
        if value is not None:
            out[f.name] = value
    return out


def parse_layers(text: str | None, n_layers: int, option: str = "--layers") -> tuple[int, ...] | None:
    """'0-31' or '3,5,7' -> indices below ``n_layers`` (`narrowgate.errors.parse_layer_set`); None -> all.

    Raises `OptionError` naming ``option`` for a malformed or empty set or an index out of range.
    """
    if text is None:
        return None
    out = parse_layer_set(str(text), option=option)
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise OptionError(
            f"{option} {text}: {bad} out of range 0..{n_layers - 1} (the model has "
            f"{n_layers if option == '--layers' else n_layers - 1} layers)."
        )
    return out


class Sweeps(Protocol):
    """Settings of experiments with ``--sweep`` over growing layer windows (ablation, overlap)."""

    sweep: bool
    sweep_step: int


def check_sweep(cfg: Sweeps, default: int) -> None:
    """Refuse ``--sweep-step`` other than its ``default`` without ``--sweep`` (it would be ignored), before the model
    loads."""
    if not cfg.sweep and int(cfg.sweep_step or default) != default:
        raise OptionError(
            f"--sweep-step {cfg.sweep_step} applies only with --sweep: add --sweep, or drop --sweep-step."
        )


def sweep_step(cfg: Sweeps, n_layers: int) -> int:
    """``--sweep-step``, refused when larger than the model's decoder layers (the sweep would have one window)."""
    step = int(cfg.sweep_step or 1)
    if step > n_layers:
        raise OptionError(
            f"--sweep-step {step} is more than the model's {n_layers} decoder layers: the sweep would have a single "
            f"window; give --sweep-step {n_layers} or less."
        )
    return step
