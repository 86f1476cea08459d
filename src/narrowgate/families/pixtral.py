"""Placeholder: adapter being written."""

from .base import Family


class Pixtral(Family):
    name = "pixtral"
    model_types = ()
