"""Datasets of the paper (VQAv2, COCO, Flickr30k, ImageNet) and synthetic stand-ins, as lazily loaded examples.

Every loader returns a list of `Example` subclasses with a stable string ``id``; images are
opened only by `Example.load_image`, and `iter_images` skips (and records) bad ones.
"""

from .base import (
    DEFAULT_SEED,
    BadExample,
    CaptionExample,
    ClassExample,
    Example,
    Skipped,
    Stream,
    VQAExample,
    by_label,
    example_digest,
    iter_images,
    sample,
    sample_per_class,
)
from .captions import (
    KARPATHY_SPLITS,
    caption_text,
    load_coco_captions,
    load_coco_karpathy,
    load_flickr30k,
)
from .imagenet import ImageNetClass, animal_classes, class_pairs, class_word, known_classes, load_imagenet
from .synthetic import (
    COLORS,
    POSITIONS,
    QUESTIONS,
    SHAPES,
    Scene,
    iter_synthetic_captions,
    iter_synthetic_vqa,
    make_scenes,
    render_scene,
    synthetic_captions,
    synthetic_class_pairs,
    synthetic_classes,
    synthetic_vqa,
)
from .vqav2 import load_vqav2, load_vqav2_hf

__all__ = [
    "BadExample",
    "COLORS",
    "CaptionExample",
    "ClassExample",
    "DEFAULT_SEED",
    "Example",
    "ImageNetClass",
    "KARPATHY_SPLITS",
    "POSITIONS",
    "QUESTIONS",
    "SHAPES",
    "Scene",
    "Skipped",
    "Stream",
    "VQAExample",
    "animal_classes",
    "by_label",
    "caption_text",
    "class_pairs",
    "class_word",
    "example_digest",
    "iter_images",
    "iter_synthetic_captions",
    "iter_synthetic_vqa",
    "known_classes",
    "load_coco_captions",
    "load_coco_karpathy",
    "load_flickr30k",
    "load_imagenet",
    "load_vqav2",
    "load_vqav2_hf",
    "make_scenes",
    "render_scene",
    "sample",
    "sample_per_class",
    "synthetic_captions",
    "synthetic_class_pairs",
    "synthetic_classes",
    "synthetic_vqa",
]
