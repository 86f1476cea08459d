"""Placeholder: adapter being written."""

from .base import Family


class Qwen2VL(Family):
    name = "qwen2_vl"
    model_types = ()
