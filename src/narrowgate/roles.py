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

Every image-side position thus has a single-position name (``boi``, ``image[k]``, ``eol[i]``,
``image_special[i]``, ``eoi``): tables that list positions use these names, and ``REST`` for the
positions of a role not listed on rows of their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import NarrowgateError

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
    "text",
    "last",
)
"""The role vocabulary used everywhere (API, CLI, tables): ``bos``; ``boi`` (image-start token); ``image`` (the
whole image span, in-image specials included); ``image_content``; ``first_image``; ``last_image``;
``internal_image``; ``eol`` (in-image line breaks); ``image_special``; ``eoi`` (the first token after the image
span: the family's end-of-image token where it has one); ``text`` (every position after ``eoi``, and every generated
token); ``last`` (the final prompt position). ``image[k]``, ``eol[i]`` and ``image_special[i]`` name one position."""

#: Roles that name exactly one position in every example.
SINGLE_POSITION_ROLES = ("bos", "boi", "first_image", "last_image", "eoi", "last")

#: Roles that take an index: ``image[k]`` (content tokens), ``eol[i]``, ``image_special[i]``.
INDEXED = ("image", "eol", "image_special")
_INDEXED = re.compile(r"(image|eol|image_special)\[(0|-?[1-9][0-9]*)\]", re.ASCII)
#: In a table that lists positions, the row for the positions not listed on rows of their own.
REST = "rest"


class RoleError(NarrowgateError, ValueError):
    """A role name is unknown, or the role is absent from an example."""


@dataclass(frozen=True)
class Role:
    """A parsed role name: ``name`` is one of ROLE_NAMES; ``index`` is set for ``image[k]``, ``eol[i]``,
    ``image_special[i]`` (one position of that role, negative counting from the end)."""

    name: str
    index: int | None = None

    def __str__(self) -> str:
        return self.name if self.index is None else f"{self.name}[{self.index}]"

    @property
    def single(self) -> bool:
        """Whether the role names exactly one position per example."""
        return self.name in SINGLE_POSITION_ROLES or self.index is not None


def parse_role(role: str | Role) -> Role:
    """Parse a role name, raising a clear error that lists the valid names."""
    if isinstance(role, Role):
        return role
    if not isinstance(role, str):
        raise RoleError(f"A role must be a string such as 'eoi' or 'image[3]', got {role!r}.")
    text = role.strip()
    if text in ROLE_NAMES:
        return Role(text)
    m = _INDEXED.fullmatch(text)
    if m:
        return Role(m.group(1), int(m.group(2)))
    raise RoleError(
        f"Unknown role {role!r}. Valid roles: {', '.join(ROLE_NAMES)}, or 'image[k]' / 'eol[i]' / 'image_special[i]' for one of them."
    )


def parse_roles(roles: str | Role | tuple | list) -> tuple[Role, ...]:
    """Parse one role or a tuple/list of roles."""
    if isinstance(roles, (str, Role)):
        return (parse_role(roles),)
    out = tuple(parse_role(r) for r in roles)
    if not out:
        raise RoleError("An empty tuple of roles names no position; give at least one role.")
    return out


def image_side(lay) -> list[tuple[int, str, str]]:
    """The image span and [EOI] of one `ImageLayout`: (position, its single-position role name, its role), in order."""
    content = {p: k for k, p in enumerate(lay.content)}
    eol = {p: i for i, p in enumerate(lay.eol)}
    out, special = [], 0
    for p in range(lay.start, lay.end + 1):
        if p in content:
            out.append((p, f"image[{content[p]}]", "image_content"))
        elif p in eol:
            out.append((p, f"eol[{eol[p]}]", "eol"))
        else:
            out.append((p, f"image_special[{special}]", "image_special"))
            special += 1
    if lay.eoi is not None:
        out.append((lay.eoi, "eoi", "eoi"))
    return out
