"""Pictures of tracking results a person can look at: mask overlays, a grid of frames (and which
frames it shows), an animated GIF."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from es3_jax.data.masks import DAVIS_PALETTE


def overlay(
    image: np.ndarray, ids: np.ndarray, palette: np.ndarray = DAVIS_PALETTE, alpha: float = 0.5
) -> np.ndarray:
    """Blend object colours over a frame and outline each object.

    image `[H, W, 3]` uint8, ids `[H, W]` object ids (0 = background) -> `[H, W, 3]` uint8.
    """
    out = image.astype(np.float32)
    colours = np.asarray(palette, np.float32)[ids]
    fg = ids > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    edge = np.zeros_like(fg)
    edge[1:, :] |= ids[1:, :] != ids[:-1, :]
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edge &= fg | np.roll(fg, 1, 0) | np.roll(fg, 1, 1)
    out[edge] = 255.0
    return np.clip(out, 0, 255).astype(np.uint8)


def grid(
    images: Sequence[np.ndarray], columns: int = 4, width: int = 320, labels: Sequence[str] = ()
) -> np.ndarray:
    """Tile frames `[H, W, 3]` uint8 into one picture, each scaled to `width` px wide, with optional
    labels."""
    cells = []
    for k, image in enumerate(images):
        h, w = image.shape[:2]
        cell = Image.fromarray(image).resize((width, max(1, round(h * width / w))), Image.Resampling.BILINEAR)
        if k < len(labels):
            draw = ImageDraw.Draw(cell)
            draw.rectangle((0, 0, 8 * len(labels[k]) + 6, 14), fill=(0, 0, 0))
            draw.text((3, 1), labels[k], fill=(255, 255, 255))
        cells.append(np.asarray(cell))
    cell_h = max(c.shape[0] for c in cells)
    rows = -(-len(cells) // columns)
    canvas = np.zeros((rows * cell_h, min(columns, len(cells)) * width, 3), np.uint8)
    for k, cell in enumerate(cells):
        r, c = divmod(k, columns)
        canvas[r * cell_h : r * cell_h + cell.shape[0], c * width : (c + 1) * width] = cell
    return canvas


class GridSample:
    """The frames a grid shows from a video of unknown length, seen one at a time: at most `limit`
    evenly spaced ones (every `stride`-th frame index, the stride doubling as the video goes on), plus
    the frames `always` names (e.g. the prompted ones)."""

    def __init__(self, limit: int, always: Sequence[int] = ()):
        self.limit = max(1, limit)
        self.always = set(always)
        self.stride = 1
        self.pictures: dict[int, np.ndarray] = {}

    def offer(self, frame_idx: int, picture: np.ndarray) -> None:
        """Keep `picture` [H, W, 3] of frame `frame_idx` if the grid shows that frame."""
        if frame_idx % self.stride and frame_idx not in self.always:
            return
        self.pictures[frame_idx] = picture
        while sum(f not in self.always for f in self.pictures) > self.limit:
            self.stride *= 2
            self.pictures = {
                f: p for f, p in self.pictures.items() if f % self.stride == 0 or f in self.always
            }

    def frames(self) -> list[int]:
        """The kept frame indices, in order."""
        return sorted(self.pictures)


def save_gif(path: str | Path, images: Sequence[np.ndarray], fps: float = 8.0, width: int = 480) -> Path:
    """An animated GIF of frames `[H, W, 3]` uint8, scaled to `width` px wide, looping."""
    frames = []
    for image in images:
        h, w = image.shape[:2]
        frames.append(
            Image.fromarray(image).resize((width, max(1, round(h * width / w))), Image.Resampling.BILINEAR)
        )
    path = Path(path)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return path
