"""Palette (indexed-colour) PNG masks, the DAVIS / YouTube-VOS / SA-V annotation format, and the
object-id map a tracker's per-object logits make.

A palette PNG stores one object id per pixel (0 = background) and a colour table; the ids,
not the colours, are the data. Written masks use the DAVIS palette, so they open in the usual
VOS tools and the official evaluators read them back unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from es3_jax.errors import Es3Error


class MaskFileError(Es3Error):
    """A mask file that is missing, unreadable or not a mask; the message names the file."""


def davis_palette() -> np.ndarray:
    """The DAVIS palette (the PASCAL VOC colour map) -> `[256, 3]` uint8.

    Colour i spreads the bits of i over the high bits of r, g, b: 1 = (128, 0, 0), 2 = (0, 128, 0), ...
    """
    ids = np.arange(256)
    palette = np.zeros((256, 3), np.uint8)
    for shift in range(8):
        for channel in range(3):
            bit = (ids >> (3 * shift + channel)) & 1
            palette[:, channel] |= (bit << (7 - shift)).astype(np.uint8)
    return palette


DAVIS_PALETTE = davis_palette()


def _open(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise MaskFileError(f"mask file not found: {path}")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise MaskFileError(f"{path}: not a readable image: {e}") from e
    return image


def read_palette_png(path: str | Path) -> np.ndarray:
    """Object ids of a mask PNG -> `[H, W]` uint8.

    Palette ('P') images give their indices; single-channel images ('L', '1') their values
    (a {0, 255} binary mask gives ids {0, 255}; use `read_binary_png` for those). Colour
    images are refused: their object ids are ambiguous.
    """
    image = _open(path)
    if image.mode in ("P", "L"):
        return np.asarray(image, dtype=np.uint8)
    if image.mode == "1":
        return np.asarray(image, dtype=np.uint8)
    raise MaskFileError(
        f"{path}: mode {image.mode!r} is not a mask (expected a palette or single-channel PNG)"
    )


def read_binary_png(path: str | Path) -> np.ndarray:
    """A mask PNG as foreground/background -> `[H, W]` bool (any nonzero id or value is foreground)."""
    image = _open(path)
    if image.mode in ("P", "L", "1"):
        return np.asarray(image) > 0
    if image.mode in ("RGB", "RGBA", "I", "I;16", "F"):
        values = np.asarray(image.convert("RGB") if image.mode == "RGBA" else image)
        return values.reshape(*values.shape[:2], -1).max(axis=-1) > 0
    raise MaskFileError(f"{path}: unsupported image mode {image.mode!r} for a mask")


def write_palette_png(path: str | Path, ids: np.ndarray, palette: np.ndarray = DAVIS_PALETTE) -> Path:
    """Write object ids `[H, W]` (integers 0..255) as a palette PNG; returns the path."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise MaskFileError(f"{path}: object ids must be [H, W], got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise MaskFileError(f"{path}: object ids must lie in 0..255, got {ids.min()}..{ids.max()}")
    palette = np.asarray(palette, np.uint8).reshape(-1, 3)
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(palette.reshape(-1).tolist())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def logits_to_ids(logits: np.ndarray, obj_ids: Sequence[int]) -> np.ndarray:
    """Per-object mask logits `[O, H, W]` -> object ids `[H, W]` uint8: each pixel goes to its
    highest-scoring object when that score is > 0 (sam2's non-overlap constraint; ties go to the earlier
    object), else 0. `obj_ids` are the O objects' ids, each in 1..255 so that it fits a palette PNG."""
    if len(obj_ids) != len(logits):
        raise ValueError(f"{len(obj_ids)} object ids for {len(logits)} mask logits")
    ids = np.asarray(obj_ids, np.int64)
    if ids.size and (ids.min() < 1 or ids.max() > 255):
        raise ValueError(f"object ids must lie in 1..255 for a palette mask, got {ids.tolist()}")
    if ids.size == 0:
        return np.zeros(logits.shape[1:], np.uint8)
    best = np.argmax(logits, axis=0)
    top = np.take_along_axis(logits, best[None], axis=0)[0]
    return np.where(top > 0, ids[best], 0).astype(np.uint8)
