"""Training-clip augmentation on frames: SAM 2's video transforms, one draw per clip.

In SAM 2's order: horizontal flip, a random affine (`affine.py`), a random resized crop (SAM 2 only
resizes to the square), the resize to the model's size, then a colour jitter shared by the clip,
grayscale, and a second, smaller jitter drawn for each frame. The geometry applies at the source
resolution to the frames and the masks alike, before the frames are resized; the colour applies to
the resized frames. Like SAM 2, the affine is dropped (the clip keeps the flip and the crop) when it
would leave some object without a pixel on the clip's first frame, the frame its prompts come from
(and the crop as well, if that still would).

Everything random is drawn by `sample_augmentation` from one generator, so a clip's augmentation is a
pure function of that generator's seed: the pipeline seeds it with (seed, epoch, slot), and a resumed
run augments exactly as an uninterrupted one.

Trunk features (DATA.USE_PRECOMPUTED) cannot be augmented: none of these maps commutes with the trunk,
so every augmented frame would need its own features. Training on a store reverses clips
(DATA.REVERSE_PROB) and nothing else.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from es3_jax.data.affine import affine_matrix, warp_frame, warp_masks

FILL = (123, 116, 103)  # SAM 2's fill outside an affine-mapped frame: the ImageNet mean
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, torchvision's grayscale


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """The ranges (DATA.AUG, with SAM 2's MOSE fine-tuning values as defaults)."""

    hflip_prob: float = 0.5
    degrees: float = 25.0
    shear: float = 20.0
    scale: tuple[float, float] = (1.0, 1.0)
    translate: float = 0.0
    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    brightness: float = 0.1
    contrast: float = 0.03
    saturation: float = 0.03
    grayscale_prob: float = 0.05
    frame_brightness: float = 0.1
    frame_contrast: float = 0.05
    frame_saturation: float = 0.05

    @classmethod
    def from_config(cls, aug) -> AugmentSpec:
        return cls(
            hflip_prob=aug.HFLIP_PROB,
            degrees=aug.DEGREES,
            shear=aug.SHEAR,
            scale=tuple(aug.SCALE),
            translate=aug.TRANSLATE,
            crop_scale=tuple(aug.CROP_SCALE),
            crop_ratio=tuple(aug.CROP_RATIO),
            brightness=aug.BRIGHTNESS,
            contrast=aug.CONTRAST,
            saturation=aug.SATURATION,
            grayscale_prob=aug.GRAYSCALE_PROB,
            frame_brightness=aug.FRAME_BRIGHTNESS,
            frame_contrast=aug.FRAME_CONTRAST,
            frame_saturation=aug.FRAME_SATURATION,
        )


@dataclasses.dataclass(frozen=True)
class Jitter:
    """Brightness, contrast, saturation factors, applied in `order` (0, 1, 2 = those three)."""

    factors: tuple[float, float, float]
    order: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """One clip's draw. Geometry in units of the source frame: `degrees`, `shear` in degrees,
    `translate` as a fraction of (width, height), `crop` = (top, left, height, width) fractions."""

    flip: bool
    degrees: float
    shear: float
    scale: float
    translate: tuple[float, float]
    crop: tuple[float, float, float, float]
    clip_jitter: Jitter
    grayscale: bool
    frame_jitters: tuple[Jitter, ...]

    def matrix(self, height: int, width: int, *, with_affine: bool = True) -> np.ndarray:
        """The flip and (unless `with_affine` is False) the affine of a `height` x `width` frame."""
        if not with_affine:
            return affine_matrix(height, width, flip=self.flip)
        return affine_matrix(
            height,
            width,
            degrees=self.degrees,
            shear=self.shear,
            scale=self.scale,
            translate=(self.translate[0] * width, self.translate[1] * height),
            flip=self.flip,
        )


def _jitter(rng: np.random.Generator, brightness: float, contrast: float, saturation: float) -> Jitter:
    factors = tuple(float(rng.uniform(max(0.0, 1 - s), 1 + s)) for s in (brightness, contrast, saturation))
    return Jitter(factors=factors, order=tuple(int(i) for i in rng.permutation(3)))


def _crop(rng: np.random.Generator, spec: AugmentSpec) -> tuple[float, float, float, float]:
    """A box of `crop_scale` of the area with an aspect ratio log-uniform in `crop_ratio`, placed
    uniformly; the whole frame when the box does not fit."""
    lo, hi = spec.crop_scale
    area = float(rng.uniform(lo, hi))
    ratio = math.exp(rng.uniform(math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1])))
    h, w = math.sqrt(area / ratio), math.sqrt(area * ratio)
    top, left = float(rng.uniform()), float(rng.uniform())  # drawn always: draws stay aligned
    if h > 1 or w > 1 or area >= 1:
        return (0.0, 0.0, 1.0, 1.0)
    return (top * (1 - h), left * (1 - w), h, w)


def sample_augmentation(spec: AugmentSpec, rng: np.random.Generator, num_frames: int) -> Augmentation:
    """One clip's augmentation: every draw from `rng`, in a fixed order."""
    flip = bool(rng.uniform() < spec.hflip_prob)
    degrees = float(rng.uniform(-spec.degrees, spec.degrees))
    shear = float(rng.uniform(-spec.shear, spec.shear))
    scale = float(rng.uniform(*spec.scale))
    translate = (float(rng.uniform(-1, 1) * spec.translate), float(rng.uniform(-1, 1) * spec.translate))
    crop = _crop(rng, spec)
    clip_jitter = _jitter(rng, spec.brightness, spec.contrast, spec.saturation)
    grayscale = bool(rng.uniform() < spec.grayscale_prob)
    frame_jitters = tuple(
        _jitter(rng, spec.frame_brightness, spec.frame_contrast, spec.frame_saturation)
        for _ in range(num_frames)
    )
    return Augmentation(flip, degrees, shear, scale, translate, crop, clip_jitter, grayscale, frame_jitters)


def _crop_box(aug: Augmentation, height: int, width: int) -> tuple[slice, slice]:
    top, left, h, w = aug.crop
    y0, x0 = round(top * height), round(left * width)
    y1, x1 = max(y0 + 1, round((top + h) * height)), max(x0 + 1, round((left + w) * width))
    return slice(y0, y1), slice(x0, x1)


def apply_geometry(
    aug: Augmentation, frames: np.ndarray, masks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Flip, affine and crop of a clip at its source size: frames `[T, H, W, 3]` uint8, masks
    `[T, O, H, W]` 0/1 -> frames `[T, h, w, 3]`, masks `[T, O, h, w]` uint8 (h, w: the crop's size).

    Every object shown on frame 0 stays shown there: the affine is dropped when it would hide one
    (SAM 2's rule), and then the crop too if it still would."""
    h, w = frames.shape[1:3]
    shown = masks[0].any(axis=(1, 2))
    full = (slice(None), slice(None))
    for with_affine, box in ((True, _crop_box(aug, h, w)), (False, _crop_box(aug, h, w)), (False, full)):
        matrix = aug.matrix(h, w, with_affine=with_affine)
        warped = warp_masks(masks.reshape(-1, h, w), matrix).reshape(masks.shape)[..., box[0], box[1]]
        if not (warped[0].any(axis=(1, 2)) < shown).any():
            break
    frames = np.stack([warp_frame(f, matrix, FILL)[box] for f in frames])
    return frames, warped


def _apply_jitter(x: np.ndarray, jitter: Jitter) -> np.ndarray:
    """torchvision's adjust_brightness / contrast / saturation on float RGB in [0, 255] `[H, W, 3]`."""
    for i in jitter.order:
        f = np.float32(jitter.factors[i])
        if i == 0:
            x = x * f
        elif i == 1:
            mean = (x @ _LUMA).mean()
            x = (x - mean) * f + mean
        else:
            gray = (x @ _LUMA)[..., None]
            x = (x - gray) * f + gray
        x = np.clip(x, 0.0, 255.0)
    return x


def apply_colour(aug: Augmentation, frames: np.ndarray) -> np.ndarray:
    """The clip's colour: uint8 `[T, S, S, 3]` -> float32 in [0, 255] of the same shape (normalise
    with `frames.normalize`)."""
    out = np.empty(frames.shape, np.float32)
    for t, frame in enumerate(frames):
        x = _apply_jitter(frame.astype(np.float32), aug.clip_jitter)
        if aug.grayscale:
            x = np.repeat((x @ _LUMA)[..., None], 3, axis=-1)
        out[t] = _apply_jitter(x, aug.frame_jitters[t])
    return out
