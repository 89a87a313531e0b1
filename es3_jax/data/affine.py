"""2-D affine maps of a frame and its masks together: the geometry of augmentation and of SA-1B
pseudo-videos.

A map is a `[3, 3]` float64 matrix taking input pixel coordinates to output ones, in PIL's continuous
convention (pixel (i, j) covers [j, j + 1) x [i, i + 1), so the frame centre is (W / 2, H / 2)).
Frames are resampled bilinearly with a fill colour outside the source; masks by nearest neighbour with
0 outside, so a mask's pixel is the label of the source pixel the frame's sample is centred on.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def affine_matrix(
    height: int,
    width: int,
    *,
    degrees: float = 0.0,
    shear: float = 0.0,
    scale: float = 1.0,
    translate: tuple[float, float] = (0.0, 0.0),
    flip: bool = False,
) -> np.ndarray:
    """The map about the frame centre: horizontal flip, then x-shear by `shear` degrees, scale,
    rotation by `degrees` (counter-clockwise on screen), then translation by `translate` = (dx, dy)
    pixels -> `[3, 3]`."""
    cx, cy = width / 2.0, height / 2.0
    to_centre = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], np.float64)
    back = np.array([[1, 0, cx + translate[0]], [0, 1, cy + translate[1]], [0, 0, 1]], np.float64)
    mirror = np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
    sh = np.array([[1, math.tan(math.radians(shear)), 0], [0, 1, 0], [0, 0, 1]], np.float64)
    a = math.radians(degrees)
    # Image rows grow downwards, so a counter-clockwise turn on screen is a negative angle here.
    rot = np.array([[math.cos(a), math.sin(a), 0], [-math.sin(a), math.cos(a), 0], [0, 0, 1]], np.float64)
    return back @ rot @ np.diag([scale, scale, 1.0]) @ sh @ mirror @ to_centre


def _pil_coefficients(matrix: np.ndarray) -> tuple[float, ...]:
    """PIL's AFFINE data: the inverse map (output -> input), first two rows."""
    inv = np.linalg.inv(matrix)
    return tuple(float(v) for v in inv[:2].reshape(-1))


def is_identity(matrix: np.ndarray) -> bool:
    return bool(np.allclose(matrix, np.eye(3), atol=1e-12))


def warp_frame(frame: np.ndarray, matrix: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
    """RGB uint8 `[H, W, 3]` -> the same size, bilinear; `fill` where the source has no pixel."""
    if is_identity(matrix):
        return frame
    image = Image.fromarray(frame).transform(
        (frame.shape[1], frame.shape[0]),
        Image.Transform.AFFINE,
        _pil_coefficients(matrix),
        resample=Image.Resampling.BILINEAR,
        fillcolor=tuple(int(c) for c in fill),
    )
    return np.asarray(image, np.uint8)


def warp_masks(masks: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Binary masks `[N, H, W]` (0/1 or bool) -> uint8 0/1 of the same shape, nearest neighbour.

    Eight masks travel as the bit planes of one 8-bit image, so N masks cost N / 8 resamplings
    (nearest neighbour never mixes the bits of two source pixels)."""
    masks = np.asarray(masks)
    if is_identity(matrix) or not len(masks):
        return masks.astype(np.uint8)
    n, h, w = masks.shape
    out = np.empty((n, h, w), np.uint8)
    coefficients = _pil_coefficients(matrix)
    weights = (np.uint8(1) << np.arange(8, dtype=np.uint8))[:, None, None]
    for start in range(0, n, 8):
        group = masks[start : start + 8].astype(np.uint8)
        packed = (group * weights[: len(group)]).sum(axis=0, dtype=np.uint8)
        warped = np.asarray(
            Image.fromarray(packed).transform(
                (w, h), Image.Transform.AFFINE, coefficients, resample=Image.Resampling.NEAREST, fillcolor=0
            )
        )
        out[start : start + len(group)] = (warped[None] & weights[: len(group)]) > 0
    return out
