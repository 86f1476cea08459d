"""Metrics of the Narrow Gate analyses: task scores (VQAv2 accuracy, CIDEr-D) and
representation geometry (neighbourhood overlap, modality gap, cluster homogeneity,
patching similarity)."""

from narrowgate.metrics.chance import cider_chance, overlap_chance, vqa_chance
from narrowgate.metrics.cider import cider, ptb_tokenize
from narrowgate.metrics.clustering import modality_homogeneity
from narrowgate.metrics.cosine import cosine_gap, cosine_gap_per_layer
from narrowgate.metrics.overlap import (
    neighborhood_overlap,
    neighborhood_overlap_per_layer,
    neighborhood_overlap_per_point,
)
from narrowgate.metrics.similarity import distribution_similarity, weighted_jaccard
from narrowgate.metrics.vqa import normalize_vqa_answer, vqa_accuracy

__all__ = [
    "cider",
    "cider_chance",
    "cosine_gap",
    "cosine_gap_per_layer",
    "distribution_similarity",
    "modality_homogeneity",
    "neighborhood_overlap",
    "neighborhood_overlap_per_layer",
    "neighborhood_overlap_per_point",
    "normalize_vqa_answer",
    "overlap_chance",
    "ptb_tokenize",
    "vqa_accuracy",
    "vqa_chance",
    "weighted_jaccard",
]
