"""From ``--data NAME --data-dir PATH`` to the examples a task needs.

Tasks: ``captions`` (COCO, Flickr30k), ``vqa`` (VQAv2), ``classes`` (ImageNet), ``image_text``
(Flickr30k captions for the modality gap). ``synthetic`` serves every task with no files.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from .. import data
from ..errors import DataError, check_count

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


def load(dataset: str, task: str, data_dir: str | Path | None, *, n: int | None, seed: int, n_per_class=None):
    """The examples of ``dataset`` for ``task`` (seeded sample of ``n``, or ``n_per_class`` per class): a list,
    or for synthetic captions and VQA a `data.Stream`."""
    check_count(n, "--n")
    check_count(n_per_class, "--n-per-class")
    if dataset not in DATASETS:
        raise DataError(f"Unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}.")
    if dataset not in TASK_DATASETS[task]:
        raise DataError(f"Dataset {dataset!r} cannot serve the {task} task; use one of {', '.join(TASK_DATASETS[task])}.")
    if dataset == "synthetic":
        return _synthetic(task, n=n, seed=seed, n_per_class=n_per_class)
    if data_dir is None:
        raise DataError(f"--data {dataset} needs --data-dir pointing at the files you have on disk.")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataError(f"--data-dir {root} does not exist.")
    try:
        return _files(dataset, root, n=n, seed=seed, n_per_class=n_per_class)
    except (KeyError, TypeError) as e:
        raise DataError(f"The {dataset} files under --data-dir {root} lack field {e} of the expected format.") from e


def _files(dataset: str, root: Path, *, n, seed, n_per_class) -> list:
    if dataset == "vqav2":
        if root.is_dir() and (any(root.rglob("*.parquet")) or any(root.rglob("*.arrow"))):
            return data.load_vqav2_hf(root, n=n, seed=seed)
        return data.load_vqav2(root, n=n, seed=seed)
    if dataset == "coco":
        found = _find(root, ("dataset_coco.json", "captions_val2014.json", "**/captions_*.json"), "COCO caption file")
        if found.name == "dataset_coco.json":
            return data.load_coco_karpathy(found, n=n, seed=seed)
        return data.load_coco_captions(found, n=n, seed=seed)
    if dataset == "flickr30k":
        found = _find(root, ("dataset_flickr30k.json", "results_20130124.token", "*.token"), "Flickr30k caption file")
        return data.load_flickr30k(found, n=n, seed=seed)
    classes = data.load_imagenet(root, split="val" if (root / "val").is_dir() else None, classes="animals",
                                 n_per_class=n_per_class, seed=seed)
    return data.sample(classes, n, seed) if n is not None else classes


def _synthetic(task: str, *, n, seed, n_per_class):
    """Captions and VQA stream (any ``n`` in constant memory); classes are a list of n_per_class x 6."""
    if task in ("captions", "image_text", "vqa"):
        n = 100 if n is None else n
        make = data.iter_synthetic_vqa if task == "vqa" else data.iter_synthetic_captions
        return data.Stream(n, partial(make, n, seed))
    examples = data.synthetic_classes(20 if n_per_class is None else n_per_class, seed)
    return data.sample(examples, n, seed) if n is not None else examples


def class_pairs(dataset: str) -> list[tuple[str, str]]:
    """The class pairs for patching: the paper's 10 ImageNet pairs, or consecutive synthetic shapes."""
    if dataset == "synthetic":
        return [tuple(p) for p in data.synthetic_class_pairs()]
    return [(a.wnid, b.wnid) for a, b in data.class_pairs()]
