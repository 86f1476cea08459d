"""`Video`: a short clip to put in a prompt, beside or instead of images (`VLM.prepare`)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image


class Video:
    """A clip's frames, in order: PIL images or an array ``[T, H, W, 3]`` (uint8). Every frame has one size.

    `VLM.prepare` takes it wherever it takes an image, on models whose processor takes video; its frames are then
    roles (``frame@t``). The processor samples or merges frames as the model was trained to (Qwen2-VL encodes two
    input frames as one, so a clip of T frames gives ``frame@1`` .. ``frame@T/2``)."""

    def __init__(self, frames: np.ndarray | Iterable[Image.Image | np.ndarray]) -> None:
        if isinstance(frames, np.ndarray):
            array = frames
        else:
            frames = list(frames)
            if not all(isinstance(f, (Image.Image, np.ndarray)) for f in frames):
                raise ValueError("A Video's frames must be PIL images or arrays [H, W, 3].")
            array = np.stack([np.asarray(f.convert("RGB") if isinstance(f, Image.Image) else f) for f in frames])
        if array.ndim != 4 or array.shape[0] < 1 or array.shape[-1] != 3:
            raise ValueError(f"A Video is frames [T, H, W, 3] with T >= 1; got an array of shape {array.shape}.")
        self.array = np.ascontiguousarray(array.astype(np.uint8, copy=False))

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def frames(self) -> list[Image.Image]:
        """The frames as PIL images."""
        return [Image.fromarray(f) for f in self.array]

    def __repr__(self) -> str:
        t, h, w, _ = self.array.shape
        return f"Video({t} frames of {w}x{h})"
