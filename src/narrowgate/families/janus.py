"""Placeholder: adapter being written."""

from .base import Family


class Janus(Family):
    name = "janus"
    model_types = ()
