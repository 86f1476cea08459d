"""The errors a user can act on.

Every error narrowgate raises for bad input or a bad environment derives from `NarrowgateError`:
the command line prints its message alone, on one line, and exits non-zero (``--debug`` or
``NARROWGATE_DEBUG=1`` shows the traceback). Anything else is a bug and keeps its traceback.
This module imports nothing heavy, so the CLI can name these errors without loading torch.
"""

from __future__ import annotations

from .deprecation import moved


class NarrowgateError(Exception):
    """Base of every error whose message names the problem and the fix."""


class DataError(NarrowgateError, ValueError):
    """The dataset cannot serve the task, or its files are not where, or what, the user said."""


class DataMissing(DataError, FileNotFoundError):
    """A dataset file or folder is not where the user said (also a `FileNotFoundError`, as it was before)."""


class PromptError(NarrowgateError, ValueError):
    """A prompt's text holds one of the model's image tokens (narrowgate places the one image itself)."""


class OptionError(NarrowgateError, ValueError):
    """A setting has a value it cannot take; the message names the option (``--layers``, ``--k``...)."""


class BaselineAtChance(DataError):
    """The model's baseline score is at or below chance: scores relative to it would mean nothing."""


#: The option parsers that lived here until 0.2 (still importable from here, with a warning, until 0.4.0).
__getattr__ = moved(
    __name__,
    "0.3.0",
    "0.4.0",
    check_count="narrowgate.parsing",
    parse_layer_set="narrowgate.parsing",
    parse_image_size="narrowgate.parsing",
    parse_size="narrowgate.parsing",
    MAX_LAYERS="narrowgate.parsing",
)
