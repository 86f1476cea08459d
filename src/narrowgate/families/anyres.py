"""What the "anyres" LLaVA families (LLaVA-NeXT, LLaVA-OneVision) share: where the newline features sit.

Both expand the ``<image>`` placeholder to one ``<image>`` token per image feature, in the order
the model packs them (``pack_image_features``): first the base image (the whole image as one
crop, ``(image_size / patch_size)**2`` features), then the high-resolution crops as one grid of
feature rows, unpadded to the image's aspect ratio, each row followed by the learned
``image_newline`` feature. Every one of these is the image token id, so the rows cannot be read
off the ids: `AnyresFamily.encode` records each image's size and `AnyresFamily.layout` places
the rows exactly as the model does. The newline features are ``eol`` and are not content tokens.
A family says only how big its feature grid is (`AnyresFamily.feature_grid`).
"""

from __future__ import annotations

from ..compat import select_best_resolution
from .base import Family, ImageLayout, LayoutError


def unpadded_grid(height: int, width: int, grid_pinpoints, crop_size: int, side: int) -> tuple[int, int]:
    """(rows, columns) of the anyres feature grid of an image of this size, after unpadding.

    The best grid resolution among ``grid_pinpoints`` gives the number of crops; each crop is
    ``side`` x ``side`` features; the rows (or columns) that only hold padding are then cut away,
    as in ``unpad_image`` of the LLaVA-NeXT and LLaVA-OneVision models.
    """
    grid_h, grid_w = select_best_resolution((height, width), grid_pinpoints)
    rows, cols = grid_h // crop_size * side, grid_w // crop_size * side
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new_rows) // 2)
    else:
        new_cols = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new_cols) // 2)
    return rows, cols


class AnyresFamily(Family):
    """An anyres LLaVA family: the image span is base features, then feature rows each closed by a newline."""

    #: The family's name in messages ("LLaVA-NeXT").
    title: str = ""

    def setup(self):
        super().setup()
        self._grids: dict[tuple[int, ...], list[tuple[int, int]]] = {}

    @property
    def crop_side(self) -> int:
        """Features per side of one crop (the vision tower's patches per side)."""
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size

    @property
    def base_features(self) -> int:
        """Features of the base image, which come first in the span."""
        return self.crop_side**2

    def feature_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of the high-resolution feature grid the model packs for an image of this size."""
        raise NotImplementedError

    def encode(self, images, texts):
        """Encode as usual, remembering each row's feature grid for `layout`."""
        inputs = super().encode(images, texts)
        self._grids = {}
        for row, (h, w) in zip(inputs["input_ids"].tolist(), inputs["image_sizes"].tolist()):
            self._grids.setdefault(tuple(row), []).append(self.feature_grid(h, w))
        return inputs

    def layout(self, ids, first) -> ImageLayout:
        lay = super().layout(ids, first)
        grids = self._grids.get(tuple(ids))
        if not grids:
            raise LayoutError(
                f"{self.title} rows can only be laid out right after this adapter encoded them (the image "
                "sizes say where the newline features sit); prepare batches with VLM.prepare."
            )
        # Identical rows are laid out in the order they were encoded.
        rows, cols = grids.pop(0) if len(grids) > 1 else grids[0]
        base = self.base_features
        length = lay.end - lay.start + 1
        if length != base + rows * (cols + 1):
            raise LayoutError(
                f"The {self.title} image span has {length} tokens, but the model packs {base} base features and "
                f"{rows} rows of {cols} features plus a newline ({base + rows * (cols + 1)} in all): the processor "
                "and the model config disagree."
            )
        lay.eol = [lay.start + base + (r + 1) * (cols + 1) - 1 for r in range(rows)]
        eol = set(lay.eol)
        lay.content = [p for p in lay.content if p not in eol]
        return lay
