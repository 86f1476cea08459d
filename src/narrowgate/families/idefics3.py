"""Idefics3 and SmolVLM (``idefics3``, ``smolvlm``: SigLIP-like tower, pixel-shuffle connector, Llama decoder).

One adapter serves both: SmolVLM's processor writes the image exactly as Idefics3's does
(SmolVLM-Instruct is even an ``idefics3`` model; SmolVLM2 is ``smolvlm``). With image splitting
the processor cuts the image into an R x C grid of tiles and writes::

    <fake_token_around_image><row_1_col_1><image>*n <fake_token_around_image><row_1_col_2><image>*n \\n
    ...
    <fake_token_around_image><row_R_col_1><image>*n ... <fake_token_around_image><row_R_col_C><image>*n \\n
    \\n<fake_token_around_image><global-img><image>*n<fake_token_around_image>

(only the written ``\\n`` are tokens; the other line wraps are for reading). The last line is the
global image, the whole image shrunk to one tile; without splitting (or for an image that fits in
one tile) it is all there is. ``n`` is ``image_seq_len``; only the ``<image>`` tokens receive image
features, every other token is an ordinary embedded token. Roles:

- ``boi``: the first ``<fake_token_around_image>``, which opens the first tile (or the global
  image). As in the other families with an image-start token (Chameleon, Emu3, Janus), ``boi`` is
  the token just before the span, not part of it.
- ``image`` (the span): everything from the token after ``boi`` to the global image's last
  ``<image>``: the ``<row_i_col_j>`` and ``<global-img>`` tags, the inner
  ``<fake_token_around_image>`` tokens, the line breaks and the ``<image>`` tokens.
- ``image_content``: the ``<image>`` tokens, tile by tile in row-major order, then the global
  image (so ``image[-1]`` / ``last_image`` is the global image's last feature).
- ``eol``: every line-break token of the span: the ``\\n`` after each tile row and the blank line
  before the global image. A tokenizer that merges ``\\n\\n`` into one token (Llama 3's does) gives
  R tokens, one that does not gives R + 1. Empty without splitting.
- ``eoi``: the ``<fake_token_around_image>`` that closes the global image, the family's
  end-of-image token.

The tags are read as text (decoded), so a tokenizer that spells ``<row_1_col_1>`` in several
tokens lays out just as well. Chat templates (Idefics3-8B-Llama3, SmolVLM): ``<|begin_of_text|>``
or ``<|im_start|>``, then ``User:<image>{prompt}<end_of_utterance>\\nAssistant:``, parts in the
order given. Raw template (no chat template): that string, with the image and text in the order
asked (``User: {prompt}<image>...`` text first), SmolVLM's starting with ``<|im_start|>``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .base import Family, ImageLayout, Inputs, Item, LayoutError

if TYPE_CHECKING:
    from transformers import BatchFeature

_TILE_TAG = re.compile(r"<row_(\d+)_col_(\d+)>")


class Idefics3(Family):
    """Idefics3 and SmolVLM: tiles and a global image, the structure read from decoded tags by `layout`."""

    name = "idefics3"
    videos = False  # SmolVLM2 writes a video as timestamped frames, each laid out as an image: not read here
    model_types = ("idefics3", "smolvlm")
    checkpoints = (
        "HuggingFaceM4/Idefics3-8B-Llama3",
        "HuggingFaceTB/SmolVLM-Instruct",
        "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
    )
    eoi_doc = "The <fake_token_around_image> that closes the global image (the last one of the image)."

    def setup(self) -> None:
        """Resolves ``<fake_token_around_image>`` (both ``boi`` and ``eoi``), the tile tags and the line breaks."""
        p = self.processor
        self.fake_token = p.fake_image_token
        self.global_tag = getattr(p, "global_image_tag", None) or getattr(p, "global_image_token", "<global-img>")
        self.end_of_utterance = getattr(p, "end_of_utterance_token", "<end_of_utterance>")
        fake = self.token_id(self.fake_token)
        self.content_ids = frozenset({self.token_id(self.image_token)})
        # For reference only: `layout` reads the structure, and tags may be spelt in several tokens.
        tags = [self.global_tag] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
        vocab = self.tokenizer.get_vocab()
        self.special_ids = frozenset({fake} | {vocab[t] for t in tags if t in vocab})
        breaks = [self.tokenizer.encode(s, add_special_tokens=False) for s in ("\n", "\n\n")]
        self.eol_ids = frozenset(ids[0] for ids in breaks if len(ids) == 1)
        self.boi_id = self.eoi_id = fake

    def raw_prompt(self, text: str, image_first: bool) -> str:
        """The chat templates' form, ``User:...<end_of_utterance>\\nAssistant:`` (SmolVLM's from ``<|im_start|>``)."""
        body = f"User:{self.image_token}{text}" if image_first else f"User: {text}{self.image_token}"
        start = "<|im_start|>" if self.config.model_type == "smolvlm" else ""
        return f"{start}{body}{self.end_of_utterance}\nAssistant:"

    def encode(self, images: list[Any], texts: list[str], videos: list[Any] | None = None) -> BatchFeature:
        """Encode with one image list per example: SmolVLM's processor reads a flat list as one example's images."""
        return super().encode([im if isinstance(im, list) else [im] for im in images], texts)

    def segments(self, ids: list[int], first: int, items: list[Item], inputs: Inputs) -> list[tuple[int, int]]:
        """Each image ends with its global image's closing ``<fake_token_around_image>``."""
        fake = self.boi_id
        (image_id,) = self.content_ids
        stops = []
        for p in range(first + 1, len(ids)):
            if ids[p] != fake or ids[p - 1] != image_id:
                continue
            run = p - 1
            while ids[run - 1] == image_id:
                run -= 1
            opening = max(i for i in range(first, run) if ids[i] == fake)
            if self._text(ids, opening + 1, run) == self.global_tag:
                stops.append(p + 1)
        if len(stops) != len(items):
            raise LayoutError(
                f"The prompt holds {len(items)} images but {len(stops)} {self.name} global images close one; the "
                "processor output does not have the expected layout."
            )
        return list(zip([first, *stops[:-1]], stops))

    # --- layout ------------------------------------------------------------------------------
    def _text(self, ids: list[int], a: int, b: int) -> str:
        return self.tokenizer.decode(ids[a:b]) if b > a else ""

    def layout(self, ids: list[int], first: int) -> ImageLayout:
        """Read off the structure: tiles in row-major order, line breaks after each row, then the global image."""
        fake = self.boi_id
        (image_id,) = self.content_ids
        fakes = [i for i in range(first, len(ids)) if ids[i] == fake]
        images = [i for i in range(first, len(ids)) if ids[i] == image_id]
        if not images:
            raise LayoutError(f"No {self.image_token} tokens found in the example: it has no image.")
        if len(fakes) < 2 or not fakes[0] < images[0] or not images[-1] < fakes[-1]:
            raise LayoutError(
                f"The {self.name} image is not enclosed by {self.fake_token} tokens; the processor output does not "
                "have the expected layout."
            )
        boi, eoi = fakes[0], fakes[-1]
        blocks = []  # (opening fake, first <image>, last <image>, next fake) per tile, then the global image
        for k, f in enumerate(fakes[:-1]):
            nxt = fakes[k + 1]
            run = [p for p in range(f + 1, nxt) if ids[p] == image_id]
            if not run or run != list(range(run[0], run[-1] + 1)):
                raise LayoutError(
                    f"Between two {self.fake_token} tokens the {self.name} image should hold one run of "
                    f"{self.image_token} tokens; narrowgate supports exactly one image per example."
                )
            blocks.append((f, run[0], run[-1], nxt))
        if sum(b - a + 1 for _, a, b, _ in blocks) != len(images):
            raise LayoutError(f"Some {self.image_token} tokens lie outside the image: one image per example.")
        if len({b - a for _, a, b, _ in blocks}) != 1:
            raise LayoutError(f"The {self.name} tiles and global image do not all have the same number of tokens.")
        *tiles, glob = blocks
        if self._text(ids, glob[0] + 1, glob[1]) != self.global_tag or glob[2] + 1 != eoi:
            raise LayoutError(
                f"The {self.name} image does not end with its global image ({self.fake_token}{self.global_tag}"
                f"{self.image_token}...{self.fake_token}); one image per example."
            )
        # Tiles: tagged <row_i_col_j> in row-major order, nothing between the tiles of a row,
        # line breaks after each row.
        tags = [self._text(ids, f + 1, a) for f, a, _, _ in tiles]
        matches = [_TILE_TAG.fullmatch(tag) for tag in tags]
        cells = [(int(m.group(1)), int(m.group(2))) if m else None for m in matches]
        n_rows, n_cols = cells[-1] if cells and cells[-1] else (0, 0)
        if cells != [(r, c) for r in range(1, n_rows + 1) for c in range(1, n_cols + 1)]:
            raise LayoutError(
                f"The {self.name} image tiles are tagged {tags}, not <row_1_col_1> ... <row_R_col_C> in row-major "
                "order; the processor output does not have the expected layout."
            )
        eol: list[int] = []
        for (row, col), (_, _, b, nxt) in zip(cells, tiles):  # type: ignore[misc]  # cells are all tuples here
            want = ("\n\n" if row == n_rows else "\n") if col == n_cols else ""
            breaks = self._text(ids, b + 1, nxt)
            if breaks != want:
                raise LayoutError(
                    f"After tile <row_{row}_col_{col}> of the {self.name} image the processor should write {want!r}, "
                    f"not {breaks!r}."
                )
            eol.extend(range(b + 1, nxt))
        content = [p for _, a, b, _ in blocks for p in range(a, b + 1)]
        return ImageLayout(start=boi + 1, end=eoi - 1, content=content, eol=eol, boi=boi, eoi=eoi)
