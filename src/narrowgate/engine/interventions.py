"""The three interventions the engine applies, as plain value objects.

- `Knockout`: queries at ``target`` roles cannot attend to keys at ``source`` roles.
- `Patch`: overwrite the residual stream at one role's position entering a decoder layer.
- `Capture`: read the residual stream at roles, every (or some) layer.

Residual index ``l`` is the input of decoder layer ``l`` (0 = embeddings); index ``n_layers`` is
the last layer's output, before the final norm — the same indexing as HF ``hidden_states``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..deprecation import renamed
from ..errors import parse_layer_set
from ..roles import Role, parse_role, parse_roles

KNOCKOUT_MODES = ("zero", "mask")


def _layers(layers) -> tuple[int, ...] | None:
    """None (every layer) or a non-empty tuple of ints: an empty set would make the intervention a no-op."""
    if layers is None:
        return None
    if isinstance(layers, int):
        return (layers,)
    out = tuple(int(x) for x in layers)
    if not out:
        raise ValueError(
            "An empty layer set names no layer (the intervention would do nothing); "
            "give None for every layer, or at least one layer."
        )
    return out


@dataclass(frozen=True)
class Knockout:
    """Queries at ``target`` cannot attend to keys at ``source`` in ``layers`` (None = all), every head.

    ``mode="zero"`` sets those post-softmax weights to zero without renormalising (the paper's
    definition); ``mode="mask"`` removes them before the softmax, so the row renormalises
    (Geva et al. 2023). During generation every generated token counts as a ``text`` position.
    """

    source: str | tuple = field(default="eoi", compare=False)
    target: str | tuple = field(default="text", compare=False)
    layers: tuple[int, ...] | None = None
    mode: str = "zero"
    #: The parsed roles; equality compares these, so ``"eoi"`` and ``("eoi",)`` name the same knockout.
    sources: tuple[Role, ...] = field(init=False, repr=False)
    targets: tuple[Role, ...] = field(init=False, repr=False)

    def __post_init__(self):
        if self.mode not in KNOCKOUT_MODES:
            raise ValueError(f"Knockout mode must be one of {KNOCKOUT_MODES}, got {self.mode!r}.")
        object.__setattr__(self, "layers", _layers(self.layers))
        object.__setattr__(self, "sources", parse_roles(self.source))
        object.__setattr__(self, "targets", parse_roles(self.target))

    @classmethod
    def parse(cls, text: str) -> Knockout:
        """The inverse of `name`: ``SRC->TGT[@LAYERS][:MODE]``, roles joined by ``+``, e.g. ``image->eoi+text@0-15:mask``."""
        spec, _, mode = str(text).strip().partition(":")
        spec, _, layers = spec.partition("@")
        src, arrow, tgt = spec.partition("->")
        if not arrow or not src or not tgt:
            raise ValueError(
                f"Knockout {text!r}: write SRC->TGT[@LAYERS][:MODE], e.g. eoi->text or image->eoi+text:mask."
            )
        picked = parse_layer_set(layers, option=f"knockout {text!r}") if layers else None
        return cls(tuple(src.split("+")), tuple(tgt.split("+")), layers=picked, mode=mode or "zero")

    @property
    def name(self) -> str:
        """Stable name used in result tables, e.g. ``eoi->text`` or ``image->eoi+text@0-15:mask``."""
        src = "+".join(str(r) for r in self.sources)
        tgt = "+".join(str(r) for r in self.targets)
        text = f"{src}->{tgt}"
        if self.layers is not None:
            text += "@" + _layer_text(self.layers)
        if self.mode != "zero":
            text += f":{self.mode}"
        return text


def _layer_text(layers: tuple[int, ...]) -> str:
    if layers and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(str(x) for x in layers)


@renamed("0.2.0", "0.3.0", layer="resid")
@dataclass(frozen=True, eq=False)
class Patch:
    """Replace the residual stream at ``role``'s position, residual index ``resid``, with ``value`` ([B, D]).

    Residual index ``resid`` is the input of decoder layer ``resid``; only later layers see the change.
    ``resid`` may be ``n_layers`` (the last layer's output). ``layer=`` is the deprecated name of ``resid=``.
    """

    role: str
    resid: int
    value: torch.Tensor

    def __post_init__(self):
        r = parse_role(self.role)
        if not r.single:
            raise ValueError(f"A patch needs a single-position role (e.g. 'eoi', 'last', 'image[k]'), got {r}.")
        if not isinstance(self.value, torch.Tensor) or self.value.dim() != 2:
            raise ValueError("Patch value must be a [batch, hidden_size] tensor.")


@renamed("0.2.0", "0.3.0", layers="resids")
@dataclass(frozen=True)
class Capture:
    """Read the residual stream at ``roles`` at residual indices ``resids`` (None = all, 0..n_layers).

    A single-position role gives ``[B, len(resids), D]``. A multi-position role (e.g.
    ``internal_image``) is averaged over its positions (``reduce="mean"``), again ``[B, len(resids), D]``.
    ``at`` adds named captures at explicit positions, one per example (e.g. a random text token):
    ``Capture(roles=(), at={"text_sample": [17, 21]})``. ``layers=`` is the deprecated name of ``resids=``.
    """

    roles: str | tuple = "eoi"
    resids: tuple[int, ...] | None = None
    reduce: str = "mean"
    at: tuple[tuple[str, tuple[int, ...]], ...] | dict | None = None
    parsed: tuple[Role, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.reduce != "mean":
            raise ValueError("Capture.reduce supports 'mean' only.")
        object.__setattr__(self, "resids", _layers(self.resids))
        object.__setattr__(self, "parsed", parse_roles(self.roles) if self.roles else ())
        at = self.at or {}
        at = tuple((str(k), tuple(int(p) for p in v)) for k, v in (at.items() if isinstance(at, dict) else at))
        object.__setattr__(self, "at", at)
        if not self.parsed and not at:
            raise ValueError("A Capture needs at least one role or one explicit position set.")
