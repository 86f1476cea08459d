"""narrowgate: how visual information reaches the text inside vision-language models."""

from .batch import Batch
from .engine.interventions import Capture, Knockout, Patch
from .engine.state import InterventionError
from .families import UnsupportedModelError, supported
from .loading import LoadError, load
from .roles import ROLE_NAMES, RoleError
from .vlm import VLM, Output

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Capture",
    "InterventionError",
    "Knockout",
    "LoadError",
    "Output",
    "Patch",
    "ROLE_NAMES",
    "RoleError",
    "UnsupportedModelError",
    "VLM",
    "load",
    "supported",
]
