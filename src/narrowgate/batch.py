"""A prepared, left-padded batch of image+text prompts that knows where every role sits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .families.base import ImageLayout
from .roles import Role, RoleError, parse_role, parse_roles


@dataclass
class Batch:
    """Model inputs plus the image layout of every example.

    ``inputs`` is exactly what the model takes (``model(**batch.inputs)``). Rows are left-padded,
    so the last prompt position is ``T - 1`` in every row. ``layouts[b]`` is example ``b``'s `ImageLayout`, or
    the list of them, in prompt order, when its prompt holds several images (or videos); `visuals` always gives
    the list.
    """

    inputs: dict
    layouts: list
    first: list[int]  # first non-padding position of each row
    bos_id: int | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        """Token ids [B, T], left-padded."""
        return self.inputs["input_ids"]

    @property
    def size(self) -> int:
        """Examples in the batch (B)."""
        return int(self.input_ids.shape[0])

    @property
    def length(self) -> int:
        """Positions per example, padding included (T)."""
        return int(self.input_ids.shape[1])

    def __len__(self) -> int:
        return self.size

    def visuals(self, b: int) -> list[ImageLayout]:
        """Example ``b``'s images and videos, in prompt order."""
        lay = self.layouts[b]
        return list(lay) if isinstance(lay, (list, tuple)) else [lay]

    @property
    def images_per_example(self) -> int:
        """The most images (and videos) any example's prompt holds."""
        return max(len(self.visuals(b)) for b in range(self.size))

    @property
    def end_of_images(self) -> int:
        """The position after the last image span of any example (a shared prefix must reach it)."""
        return max(v.end for b in range(self.size) for v in self.visuals(b)) + 1

    # --- roles ---------------------------------------------------------------------------------
    def _chosen(self, b: int, role: Role) -> list[tuple[int, ImageLayout]]:
        """(number, layout) of the images ``role`` covers in example ``b``: the one ``role.at`` names, or every one."""
        vis = list(enumerate(self.visuals(b), start=1))
        if role.name == "frame" or role.at is None:
            return vis
        n = role.at if role.at > 0 else len(vis) + 1 + role.at
        return [vis[n - 1]] if 1 <= n <= len(vis) else []

    def _image_positions(self, b: int, role: Role, n: int, lay: ImageLayout) -> list[int]:
        """Positions of per-image ``role`` (no index) in image ``n`` (``lay``) of example ``b``."""
        name = role.name
        if name == "boi":
            return [] if lay.boi is None else [lay.boi]
        if name == "image":
            return list(range(lay.start, lay.end + 1))
        if name == "image_content":
            return list(lay.content)
        if name == "first_image":
            return lay.content[:1]
        if name == "last_image":
            return lay.content[-1:]
        if name == "internal_image":
            return list(lay.content[1:-1])
        if name == "eol":
            return list(lay.eol)
        if name == "image_special":
            other = set(lay.content) | set(lay.eol)
            return [p for p in range(lay.start, lay.end + 1) if p not in other]
        if name == "eoi":
            return [] if lay.eoi is None else [lay.eoi]
        if name == "between":
            vis = self.visuals(b)
            if n == len(vis) or lay.eoi is None:
                return []
            return list(range(lay.eoi + 1, vis[n].first))
        if name == "frame":
            assert role.at is not None  # `parse_role` refuses a frame without its image number
            t = role.at if role.at > 0 else len(lay.frames) + 1 + role.at
            return list(lay.frames[t - 1]) if 1 <= t <= len(lay.frames) else []
        raise RoleError(f"Unhandled role {role}.")

    def _row_positions(self, b: int, role: Role) -> list[int]:
        name, first, T = role.name, self.first[b], self.length
        if name == "bos":
            return [first] if self.bos_id is not None and int(self.input_ids[b, first]) == self.bos_id else []
        if name == "text":
            eoi = self.visuals(b)[-1].eoi
            return [] if eoi is None else list(range(eoi + 1, T))
        if name == "last":
            return [T - 1]
        out: list[int] = []
        base = Role("image_content" if name == "image" else name, None, role.at) if role.index is not None else role
        for n, lay in self._chosen(b, role):
            everyone = self._image_positions(b, base, n, lay)
            if role.index is None:
                out += everyone
            elif -len(everyone) <= role.index < len(everyone):
                out.append(everyone[role.index])
        return sorted(out)

    def positions(self, role: str | Role) -> list[torch.Tensor]:
        """Per example, the positions (LongTensor) of ``role`` in the padded batch. May be empty."""
        r = parse_role(role)
        return [torch.tensor(self._row_positions(b, r), dtype=torch.long) for b in range(self.size)]

    def ambiguous(self, role: str | Role) -> str | None:
        """Why a single-position role (``eoi``, ``image[k]``) does not name one position per example here: the
        prompts hold several images and the role names none of them (None: it is not ambiguous)."""
        r = parse_role(role)
        if not r.single or r.at is not None or not r.per_image:
            return None
        for b in range(self.size):
            pos = self._row_positions(b, r)
            if len(pos) > 1:
                n = len(self.visuals(b))
                return (
                    f"Role {r} names {len(pos)} positions in example {b}, one per image of its {n}; name the image: "
                    + ", ".join(f"{Role(r.name, r.index, k)}" for k in range(1, n + 1))
                    + "."
                )
        return None

    def index(self, role: str | Role) -> torch.Tensor:
        """Per example, the single position of ``role`` ([B] LongTensor).

        Raises if the role is absent from an example or names several positions (with several images, ``eoi``
        names one per image: name one, ``eoi@2``).
        """
        r = parse_role(role)
        why = self.ambiguous(r)
        if why:
            raise RoleError(why)
        out = []
        for b in range(self.size):
            pos = self._row_positions(b, r)
            if len(pos) != 1:
                what = "is absent from" if not pos else f"names {len(pos)} positions in"
                raise RoleError(
                    f"Role {r} {what} example {b}; a single-position role is needed here "
                    f"(e.g. 'eoi', 'last', 'last_image', 'image[k]', 'eoi@2')."
                )
            out.append(pos[0])
        return torch.tensor(out, dtype=torch.long)

    def mask(self, roles: str | Role | tuple | list, *, require: bool = True) -> torch.Tensor:
        """[B, T] boolean mask of the union of ``roles``.

        With ``require`` (the default), a role that is empty in every example raises: an
        intervention on it would silently do nothing.
        """
        parsed = parse_roles(roles)
        m = torch.zeros(self.size, self.length, dtype=torch.bool)
        for r in parsed:
            hit = False
            for b in range(self.size):
                pos = self._row_positions(b, r)
                if pos:
                    m[b, pos] = True
                    hit = True
            if require and not hit:
                why = (
                    "its prompts hold fewer images"
                    if r.at is not None and r.name != "frame"
                    else "this family may not have it"
                )
                raise RoleError(f"Role {r} is empty in every example of this batch ({why}).")
        return m
