"""Placeholder: adapter being written."""

from .base import Family


class Chameleon(Family):
    name = "chameleon"
    model_types = ()
