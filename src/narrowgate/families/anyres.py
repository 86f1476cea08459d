"""What the "anyres" LLaVA families (LLaVA-NeXT, LLaVA-OneVision) share: where the newline features sit.

Both expand the ``<image>`` placeholder to one ``<image>`` token per image feature, in the order
the model packs them (``pack_image_features``): first the base image (the whole image as one
crop, ``(image_size / patch_size)**2`` features), then the high-resolution crops as one grid of
feature rows, unpadded to the image's aspect ratio, each row followed by the learned
``image_newline`` feature. Every one of these is the image token id, so the rows cannot be read
off the ids: `AnyresFamily.layouts` places them from each image's size (the processor's ``image_sizes``)
exactly as the model does. The newline features are ``eol`` and are not content tokens.
A family says only how big its feature grid is (`AnyresFamily.feature_grid`) and whether it patches every image
of a prompt holding several (`AnyresFamily.patched`).
"""

from __future__ import annotations

from abc import abstractmethod

from ..compat import select_best_resolution
from .base import Family, ImageLayout, Inputs, Item, LayoutError


def unpadded_grid(
    height: int, width: int, grid_pinpoints: list[list[int]], crop_size: int, side: int
) -> tuple[int, int]:
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

    @property
    def crop_side(self) -> int:
        """Features per side of one crop (the vision tower's patches per side)."""
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size

    @property
    def base_features(self) -> int:
        """Features of the base image, which come first in the span."""
        return self.crop_side**2

    @abstractmethod
    def feature_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of the high-resolution feature grid the model packs for an image of this size."""

    def patched(self, images: int) -> bool:
        """Whether the model adds the high-resolution grid to each image of a prompt holding ``images`` images."""
        return True

    def image_rows(self, inputs: Inputs, item: Item, images: int) -> tuple[int, int] | None:
        """(rows, columns) of the image's feature grid, or None for the base features and one newline alone (an
        image the model does not patch)."""
        if not self.patched(images):
            return None
        h, w = (int(x) for x in inputs["image_sizes"][item.index])
        return self.feature_grid(h, w)

    def layouts(self, ids: list[int], first: int, items: list[Item], inputs: Inputs) -> list[ImageLayout]:
        """Each image's span from the ids, then its newline features where the model packs them."""
        out = super().layouts(ids, first, items, inputs)
        images = sum(i.kind == "image" for i in items)
        for lay, item in zip(out, items):
            if item.kind == "image":
                self._place_rows(lay, self.image_rows(inputs, item, images))
        return out

    def _place_rows(self, lay: ImageLayout, grid: tuple[int, int] | None) -> None:
        base = self.base_features
        length = lay.end - lay.start + 1
        rows, cols = grid if grid is not None else (1, 0)
        want = base + rows * (cols + 1)
        if length != want:
            raise LayoutError(
                f"The {self.title} image span has {length} tokens, but the model packs {base} base features and "
                f"{rows} rows of {cols} features plus a newline ({want} in all): the processor and the model "
                "config disagree."
            )
        lay.eol = [lay.start + base + (r + 1) * (cols + 1) - 1 for r in range(rows)]
        eol = set(lay.eol)
        lay.content = [p for p in lay.content if p not in eol]

    def item_lengths(self, items: list[Item], inputs: Inputs) -> list[int] | None:
        """Images written back to back (the llava-hf chat templates do) are told apart by their lengths."""
        images = sum(i.kind == "image" for i in items)
        out = []
        for item in items:
            if item.kind == "video":
                return None
            grid = self.image_rows(inputs, item, images)
            rows, cols = grid if grid is not None else (1, 0)
            out.append(self.base_features + rows * (cols + 1))
        return out

    def video_newlines(self, lay: ImageLayout) -> ImageLayout:
        """A video's frames, pooled, one after the other, then one newline feature (``eol``) closing the span."""
        lay.eol = [lay.end]
        lay.content = lay.content[:-1]
        return lay
