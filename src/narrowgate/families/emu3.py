"""Placeholder: adapter being written."""

from .base import Family


class Emu3(Family):
    name = "emu3"
    model_types = ()
