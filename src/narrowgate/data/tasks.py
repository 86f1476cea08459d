"""From ``--data NAME --data-dir PATH`` to the examples a task needs.

Tasks: ``captions`` (COCO, Flickr30k), ``vqa`` (VQAv2), ``classes`` (ImageNet), ``image_text``
(Flickr30k captions for the modality gap). ``synthetic`` serves every task with no files.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from .. import data
from ..errors import DataError
from ..parsing import check_count

DATASETS = ("vqav2", "coco", "flickr30k", "imagenet", "synthetic")
TASK_DATASETS = {
    "captions": ("coco", "flickr30k", "synthetic"),
    "vqa": ("vqav2", "synthetic"),
    "classes": ("imagenet", "synthetic"),
    "image_text": ("flickr30k", "coco", "synthetic"),
}


def _find(root: Path, patterns: tuple[str, ...], what: str) -> Path:
    if root.is_file():
        return root
    for pattern in patterns:
        hits = sorted(root.glob(pattern))
        if hits:
            return hits[0]
    raise DataError(f"No {what} found in {root} (looked for {', '.join(patterns)}).")


def too_few(what: str, asked: int, have: int, where: str = "") -> DataError:
    """The error for a sample larger than what exists: how many exist, and how to accept fewer."""
    return DataError(
        f"Asked for {asked} {what} but only {have} exist{' in ' + where if where else ''}. Give a smaller number, "
        f"point --data-dir at a larger copy, or pass --allow-fewer to run on the {have} there are."
    )


def _checked(examples: list, n: int | None, allow_fewer: bool, where: str) -> list:
    """A loader's seeded sample of ``n``, refused when the loader had fewer (unless ``allow_fewer``)."""
    if n is not None and len(examples) < n and not allow_fewer:
        raise too_few("examples", n, len(examples), where)
    return examples


def _sample(examples: list, n: int | None, seed: int, allow_fewer: bool, where: str) -> list:
    return _checked(data.sample(examples, n, seed) if n is not None else examples, n, allow_fewer, where)


def _per_class(examples: list, n_per_class: int | None, seed: int, allow_fewer: bool, where: str) -> list:
    if n_per_class is None:
        return examples
    short = {k: len(v) for k, v in data.by_label(examples).items() if len(v) < n_per_class}
    if short and not allow_fewer:
        listed = ", ".join(f"{k}: {v}" for k, v in sorted(short.items())[:5])
        raise too_few(
            f"images per class ({len(short)} classes have fewer, e.g. {listed})",
            n_per_class,
            min(short.values()),
            where,
        )
    return data.sample_per_class(examples, n_per_class, seed)


def require_answers(examples, where) -> None:
    """Refuse VQA questions that come without their human answers (a score needs them), before the model loads."""
    if isinstance(examples, list) and examples and not any(e.answers for e in examples if e.defect is None):
        raise DataError(
            f"None of the {len(examples)} VQA questions from {where} has answers: the annotations file "
            "(v2_mscoco_val2014_annotations.json beside the questions file) or the Parquet copy's 'answers' column is "
            "missing, and VQA accuracy needs them. Put the annotations file beside the questions."
        )


def imagenet_split(root: Path) -> str | None:
    """The split the paper sampled (``train/``) when it is on disk, else ``val/``, else class folders in ``root``."""
    for split in ("train", "val"):
        if (root / split).is_dir():
            return split
    return None


def load(
    dataset: str,
    task: str,
    data_dir: str | Path | None,
    *,
    n: int | None = None,
    seed: int,
    n_per_class=None,
    classes: str = "animals",
    allow_fewer: bool = False,
) -> list:
    """The examples of ``dataset`` for ``task`` (seeded sample of ``n``, or ``n_per_class`` per class).

    ``classes`` picks the ImageNet classes: the paper's 100 ``animals`` or the 20 classes of its patching
    ``pairs``. A sample larger than what exists is an error unless ``allow_fewer``. Each dataset is read
    from the split the paper used when it is on disk: ImageNet ``train/`` (else ``val/``), every image of
    the Flickr30k token file (else the Karpathy test split). Synthetic captions and VQA come as a
    `data.Stream` (any ``n`` in constant memory).
    """
    check_count(n, "--n")
    check_count(n_per_class, "--n-per-class")
    if dataset not in DATASETS:
        raise DataError(f"Unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}.")
    if dataset not in TASK_DATASETS[task]:
        raise DataError(
            f"Dataset {dataset!r} cannot serve the {task} task; use one of {', '.join(TASK_DATASETS[task])}."
        )
    if dataset == "synthetic":
        return _synthetic(task, n=n, seed=seed, n_per_class=n_per_class, classes=classes, allow_fewer=allow_fewer)
    if data_dir is None:
        raise DataError(f"--data {dataset} needs --data-dir pointing at the files you have on disk.")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataError(f"--data-dir {root} does not exist.")
    try:
        return _files(dataset, root, n=n, seed=seed, n_per_class=n_per_class, classes=classes, allow_fewer=allow_fewer)
    except (KeyError, TypeError) as e:
        raise DataError(f"The {dataset} files under --data-dir {root} lack field {e} of the expected format.") from e


def _files(dataset: str, root: Path, *, n, seed, n_per_class, classes: str, allow_fewer: bool) -> list:
    if dataset == "vqav2":
        if root.is_dir() and (any(root.rglob("*.parquet")) or any(root.rglob("*.arrow"))):
            return _checked(data.load_vqav2_hf(root, n=n, seed=seed), n, allow_fewer, str(root))
        return _checked(data.load_vqav2(root, n=n, seed=seed), n, allow_fewer, str(root))
    if dataset == "coco":
        found = _find(root, ("dataset_coco.json", "captions_val2014.json", "**/captions_*.json"), "COCO caption file")
        if found.name == "dataset_coco.json":
            return _checked(
                data.load_coco_karpathy(found, n=n, seed=seed), n, allow_fewer, f"the Karpathy test split of {found}"
            )
        return _checked(data.load_coco_captions(found, n=n, seed=seed), n, allow_fewer, str(found))
    if dataset == "flickr30k":
        found = _find(root, ("results_20130124.token", "*.token", "dataset_flickr30k.json"), "Flickr30k caption file")
        where = str(found) if found.suffix != ".json" else f"the Karpathy test split of {found}"
        return _checked(data.load_flickr30k(found, n=n, seed=seed), n, allow_fewer, where)
    split = imagenet_split(root)
    try:
        pool = data.load_imagenet(root, split=split, classes=classes)
    except FileNotFoundError as exc:
        raise DataError(
            f"{exc}. The {classes!r} classes of the paper are needed (see narrowgate.data.imagenet)."
        ) from exc
    where = str(root / split) if split else str(root)
    wanted = {c.wnid for c in data.animal_classes()} if classes == "animals" else None
    if wanted is None:
        wanted = {c.wnid for pair in data.class_pairs() for c in pair}
    empty = sorted(wanted - {e.label for e in pool})
    if empty and not allow_fewer:
        raise DataError(
            f"{len(empty)} of the {len(wanted)} {classes!r} classes have no image in {where} (e.g. "
            f"{', '.join(empty[:3])}): the copy is incomplete. Fill those folders, or pass --allow-fewer to run on "
            f"the {len(wanted) - len(empty)} classes there are."
        )
    return _sample(_per_class(pool, n_per_class, seed, allow_fewer, where), n, seed, allow_fewer, where)


def _synthetic(task: str, *, n, seed, n_per_class, classes="animals", allow_fewer: bool = False):
    """Captions and VQA stream (any ``n`` in constant memory); classes are a list of n_per_class x 6."""
    if task in ("captions", "image_text", "vqa"):
        n = 100 if n is None else n
        make = data.iter_synthetic_vqa if task == "vqa" else data.iter_synthetic_captions
        return data.Stream(n, partial(make, n, seed))
    examples = data.synthetic_classes(20 if n_per_class is None else n_per_class, seed)
    if classes == "pairs":
        wanted = {c for pair in data.synthetic_class_pairs() for c in pair}
        examples = [e for e in examples if e.label in wanted]
    if n is not None and n > len(examples) and not allow_fewer:
        n_classes = len({e.label for e in examples})
        per = len(examples) // n_classes
        raise DataError(
            f"Asked for {n} examples but the synthetic classes at --n-per-class {per} have {len(examples)} "
            f"({n_classes} classes x {per}). Give --n {len(examples)} or less, raise --n-per-class to "
            f"{-(-n // n_classes)}, or pass --allow-fewer to run on the {len(examples)} there are."
        )
    return data.sample(examples, n, seed) if n is not None else examples


def class_pairs(dataset: str) -> list[tuple[str, str]]:
    """The class pairs for patching: the paper's 10 ImageNet pairs, or consecutive synthetic shapes."""
    if dataset == "synthetic":
        return list(data.synthetic_class_pairs())
    return [(a.wnid, b.wnid) for a, b in data.class_pairs()]
