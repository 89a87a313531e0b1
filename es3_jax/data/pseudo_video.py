"""A still image as a training clip: the image and its masks moved together by a smooth random motion.

Frame 0 is the image itself, so every object picked from it is visible on the frame its prompts come
from; the last frame is a random pose (rotation, x-shear, scale, translation within the
DATA.SA1B ranges), and the frames between follow a smoothstep from the one to the other (no jump at
either end). Each frame is one affine map of the source (`affine.py`), so masks stay aligned with the
pixels they label. The motion is a pure function of its generator.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from es3_jax.data.affine import affine_matrix, warp_frame, warp_masks
from es3_jax.data.augment import FILL


@dataclasses.dataclass(frozen=True)
class MotionSpec:
    """Ranges of the last frame's pose (DATA.SA1B)."""

    degrees: float = 10.0
    shear: float = 5.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate: float = 0.1  # fraction of the image size

    @classmethod
    def from_config(cls, sa1b) -> MotionSpec:
        return cls(degrees=sa1b.DEGREES, shear=sa1b.SHEAR, scale=tuple(sa1b.SCALE), translate=sa1b.TRANSLATE)


def sample_motion(
    spec: MotionSpec, rng: np.random.Generator, num_frames: int, height: int, width: int
) -> np.ndarray:
    """The maps of a clip's frames `[T, 3, 3]`: identity on frame 0, smooth to a random last pose."""
    degrees = rng.uniform(-spec.degrees, spec.degrees)
    shear = rng.uniform(-spec.shear, spec.shear)
    log_scale = rng.uniform(np.log(spec.scale[0]), np.log(spec.scale[1]))
    translate = rng.uniform(-1, 1, size=2) * spec.translate * np.array([width, height])
    s = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    s = s * s * (3 - 2 * s)
    return np.stack(
        [
            affine_matrix(
                height,
                width,
                degrees=float(degrees * u),
                shear=float(shear * u),
                scale=float(np.exp(log_scale * u)),
                translate=(float(translate[0] * u), float(translate[1] * u)),
            )
            for u in s
        ]
    )


def make_clip(image: np.ndarray, masks: np.ndarray, matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image `[H, W, 3]` uint8 and its masks `[O, H, W]` 0/1 -> frames `[T, H, W, 3]` uint8 and masks
    `[T, O, H, W]` uint8, frame t mapped by `matrices[t]`."""
    frames = np.stack([warp_frame(image, m, FILL) for m in matrices])
    moved = np.stack([warp_masks(masks, m) for m in matrices])
    return frames, moved
