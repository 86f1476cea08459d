"""Placeholder: adapter being written."""

from .base import Family


class LlavaOneVision(Family):
    name = "llava_onevision"
    model_types = ()
