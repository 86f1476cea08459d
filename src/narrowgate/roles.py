"""Token roles: the one vocabulary for naming positions in a VLM prompt.

A role names a set of positions in each example of a batch. The same names are used by
`Batch.positions`, knockouts, patches, captures, result tables and the CLI.

- ``bos``: beginning-of-sequence token (empty if the family's prompt has none).
- ``boi``: the image-start special token, where the family has one.
- ``image``: every token of the image span (content tokens plus in-image specials such as
  line breaks and size tokens).
- ``image_content``: the image's content tokens only.
- ``first_image`` / ``last_image``: the first / last content token.
- ``image[k]``: the k-th content token (0-based; negative k counts from the end).
- ``internal_image``: content tokens except the first and the last.
- ``eol``: in-image line-break tokens (empty if the family has none); ``eol[i]`` the i-th.
- ``image_special``: other in-image special tokens (size tokens, tile markers...); ``image_special[i]`` the i-th.
- ``eoi``: the first token after the image span (the family's end-of-image token where one exists).
- ``text``: every position after ``eoi`` (and every generated token during generation).
- ``last``: the final prompt position.

Several images (and videos) in one prompt: ``NAME@n`` is that role of the n-th image only (1-based, in prompt order;
negative n counts from the end): ``image@2``, ``eoi@1``, ``image@2[k]``, ``boi@-1``. A role without ``@`` is the
union of that role over every image, so ``image`` is every image's span, ``eoi`` every image's [EOI] (one position
per image) and ``image[k]`` the k-th content token of each image; ``text`` is every position after the *last*
image's ``eoi``. ``between`` names the positions after an image's ``eoi`` and before the next image (``between@n``:
after image n; ``between[i]`` / ``between@n[i]``: the i-th of them). In a video, ``frame@t`` names the content
tokens of frame t (1-based; the model's frames: Qwen2-VL merges ``temporal_patch_size`` input frames into one), and
``frame@t[k]`` the k-th of them; a video is one image for every other role. A single-position role (``eoi``,
``image[k]``...) names one position per image, so with several images a consumer that needs one position (`Patch`,
`Capture`, `Batch.index`) refuses it and asks for ``eoi@n``.

Every image-side position thus has a single-position name (``boi``, ``image[k]``, ``eol[i]``,
``image_special[i]``, ``eoi``): tables that list positions use these names, and ``REST`` for the
positions of a role not listed on rows of their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import NarrowgateError

if TYPE_CHECKING:
    from .families.base import ImageLayout

ROLE_NAMES = (
    "bos",
    "boi",
    "image",
    "image_content",
    "first_image",
    "last_image",
    "internal_image",
    "eol",
    "image_special",
    "eoi",
    "between",
    "text",
    "last",
)
"""The role vocabulary used everywhere (API, CLI, tables): ``bos``; ``boi`` (image-start token); ``image`` (the
whole image span, in-image specials included); ``image_content``; ``first_image``; ``last_image``;
``internal_image``; ``eol`` (in-image line breaks); ``image_special``; ``eoi`` (the first token after the image
span: the family's end-of-image token where it has one); ``text`` (every position after ``eoi``, and every generated
token); ``last`` (the final prompt position); ``between`` (positions between two images). ``image[k]``, ``eol[i]``,
``image_special[i]`` and ``between[i]`` name one position per image; ``NAME@n`` (``eoi@2``, ``image@1[3]``) is the
n-th image's, ``frame@t`` / ``frame@t[k]`` a video's frame t."""

#: Roles that name exactly one position in every example.
SINGLE_POSITION_ROLES = ("bos", "boi", "first_image", "last_image", "eoi", "last")

#: Roles that take an index: ``image[k]`` (content tokens), ``eol[i]``, ``image_special[i]``, ``between[i]``,
#: ``frame@t[k]``.
INDEXED = ("image", "eol", "image_special", "between", "frame")
#: Roles that take an image number (``eoi@2``): every role of an image's own positions; ``frame`` requires one.
PER_IMAGE: tuple[str, ...] = (
    "boi",
    "image",
    "image_content",
    "first_image",
    "last_image",
    "internal_image",
    "eol",
    "image_special",
)
PER_IMAGE += ("eoi", "between", "frame")
_NUMBER = r"(0|-?[1-9][0-9]*)"
_GRAMMAR = re.compile(rf"([a-z_]+)(?:@(-?[1-9][0-9]*))?(?:\[{_NUMBER}\])?", re.ASCII)
#: In a table that lists positions, the row for the positions not listed on rows of their own.
REST = "rest"


class RoleError(NarrowgateError, ValueError):
    """A role name is unknown, or the role is absent from an example."""


@dataclass(frozen=True)
class Role:
    """A parsed role name: ``name`` is one of ROLE_NAMES (or ``frame``); ``index`` is set for ``image[k]``,
    ``eol[i]``, ``image_special[i]``, ``between[i]``, ``frame@t[k]`` (one position of that role, negative counting
    from the end); ``at`` is the image number of ``eoi@2``-style roles (1-based, negative from the end), or the
    frame number of ``frame@t``."""

    name: str
    index: int | None = None
    at: int | None = None

    def __str__(self) -> str:
        text = self.name if self.at is None else f"{self.name}@{self.at}"
        return text if self.index is None else f"{text}[{self.index}]"

    @property
    def single(self) -> bool:
        """Whether the role names exactly one position per image (per example when the prompt holds one image, or
        when ``at`` names the image)."""
        return self.name in SINGLE_POSITION_ROLES or self.index is not None

    @property
    def per_image(self) -> bool:
        """Whether the role names positions of one image (or video) each: it is a union over the images unless
        ``at`` names one."""
        return self.name in PER_IMAGE


def parse_role(role: str | Role) -> Role:
    """Parse a role name, raising a clear error that lists the valid names."""
    if isinstance(role, Role):
        return role
    if not isinstance(role, str):
        raise RoleError(f"A role must be a string such as 'eoi' or 'image[3]', got {role!r}.")
    text = role.strip()
    if text in ROLE_NAMES:
        return Role(text)
    m = _GRAMMAR.fullmatch(text)
    if m:
        name, at, index = m.group(1), m.group(2), m.group(3)
        ok = (name in ROLE_NAMES or name == "frame") and (index is None or name in INDEXED)
        ok = ok and (at is None or name in PER_IMAGE) and (name != "frame" or at is not None)
        if ok:
            return Role(name, None if index is None else int(index), None if at is None else int(at))
    raise RoleError(
        f"Unknown role {role!r}. Valid roles: {', '.join(ROLE_NAMES)}; 'image[k]' / 'eol[i]' / 'image_special[i]' / "
        "'between[i]' for one of them; 'eoi@n', 'image@n[k]'... for the n-th image's; 'frame@t', 'frame@t[k]' in a "
        "video."
    )


def parse_roles(roles: str | Role | tuple | list) -> tuple[Role, ...]:
    """Parse one role or a tuple/list of roles."""
    if isinstance(roles, (str, Role)):
        return (parse_role(roles),)
    out = tuple(parse_role(r) for r in roles)
    if not out:
        raise RoleError("An empty tuple of roles names no position; give at least one role.")
    return out


def image_side(lay: ImageLayout, n: int | None = None) -> list[tuple[int, str, str]]:
    """The image span and [EOI] of one `ImageLayout`: (position, its single-position role name, its role), in order.

    ``n``: the image's number in a prompt holding several (names become ``image@n[k]``, ``eoi@n``...); None for a
    prompt's only image, whose names carry no number (a video's content tokens are then named ``frame@t[k]``)."""
    at = "" if n is None else f"@{n}"
    content = {p: f"image{at}[{k}]" for k, p in enumerate(lay.content)}
    if n is None:
        content |= {p: f"frame@{t + 1}[{k}]" for t, frame in enumerate(lay.frames) for k, p in enumerate(frame)}
    eol = {p: i for i, p in enumerate(lay.eol)}
    out, special = [], 0
    for p in range(lay.start, lay.end + 1):
        if p in content:
            out.append((p, content[p], "image_content"))
        elif p in eol:
            out.append((p, f"eol{at}[{eol[p]}]", "eol"))
        else:
            out.append((p, f"image_special{at}[{special}]", "image_special"))
            special += 1
    if lay.eoi is not None:
        out.append((lay.eoi, f"eoi{at}", "eoi"))
    return out
