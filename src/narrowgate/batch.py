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
    so the last prompt position is ``T - 1`` in every row.
    """

    inputs: dict
    layouts: list[ImageLayout]
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

    # --- roles ---------------------------------------------------------------------------------
    def _row_positions(self, b: int, role: Role) -> list[int]:
        lay, first, T = self.layouts[b], self.first[b], self.length
        name = role.name
        if role.index is not None:
            everyone = self._row_positions(b, Role("image_content" if name == "image" else name))
            k = role.index
            return [everyone[k]] if -len(everyone) <= k < len(everyone) else []
        if name == "bos":
            return [first] if self.bos_id is not None and int(self.input_ids[b, first]) == self.bos_id else []
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
        if name == "text":
            return [] if lay.eoi is None else list(range(lay.eoi + 1, T))
        if name == "last":
            return [T - 1]
        raise RoleError(f"Unhandled role {role}.")

    def positions(self, role: str | Role) -> list[torch.Tensor]:
        """Per example, the positions (LongTensor) of ``role`` in the padded batch. May be empty."""
        r = parse_role(role)
        return [torch.tensor(self._row_positions(b, r), dtype=torch.long) for b in range(self.size)]

    def index(self, role: str | Role) -> torch.Tensor:
        """Per example, the single position of ``role`` ([B] LongTensor).

        Raises if the role is absent from an example or names several positions.
        """
        r = parse_role(role)
        out = []
        for b in range(self.size):
            pos = self._row_positions(b, r)
            if len(pos) != 1:
                what = "is absent from" if not pos else f"names {len(pos)} positions in"
                raise RoleError(
                    f"Role {r} {what} example {b}; a single-position role is needed here "
                    f"(e.g. 'eoi', 'last', 'last_image', 'image[k]')."
                )
            out.append(pos[0])
        return torch.tensor(out, dtype=torch.long)

    def mask(self, roles, *, require: bool = True) -> torch.Tensor:
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
                raise RoleError(f"Role {r} is empty in every example of this batch (this family may not have it).")
        return m
