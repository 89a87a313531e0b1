"""Synthetic SA-V-format videos: textured shapes that move, rotate, occlude each other, enter and leave;
and SA-1B-format images of the same shapes (`make_sa1b`, laid out as `sa1b.py` reads them).

Each video is written as the SA-V extracted-frames layout plus its annotation:

    <output_dir>/<video>/00000.jpg, 00004.jpg, ...      every annotated frame, named by its 24-fps index
    <output_dir>/<video>_manual.json                    SA-V fields, COCO-RLE masklets [frame][object]

so `DATA.SAV_ROOT <output_dir>` trains on it directly (annotations are found beside the frame folders).
Masks are modal (only the visible part; an object hidden by another or outside the frame is an empty
RLE), like SA-V's. Every video has 1-3 objects with clearly different shapes, colours and (unless
`Style.textured` is off) textures, whose full area is 2-30% of the frame by default, over a muted
textured background that pans slowly. A video is a pure function of (seed, video index, style); the
style changes how objects look, never where they go.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from es3_jax.data.sav import ANN_EVERY, encode_mask, rle_area
from es3_jax.progress import progress_bar

SHAPES = ("ellipse", "rectangle", "triangle", "star", "hexagon", "cross")
TEXTURES = ("stripes", "checker", "dots", "rings")


@dataclass(frozen=True)
class Style:
    """How the objects look. Areas are of the frame, for the full (unoccluded) shape; its ±10% scale
    wobble keeps the default 3-20% within 2-30%."""

    textured: bool = True  # False: each object in one flat colour
    min_area: float = 0.03
    max_area: float = 0.2


def _unit_shape(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Polygon [V, 2] around the origin, radius about 1."""
    if kind == "ellipse":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        aspect = rng.uniform(0.5, 1.0)
        return np.stack([np.cos(t), aspect * np.sin(t)], 1)
    if kind == "rectangle":
        aspect = rng.uniform(0.4, 1.0)
        return np.array([[-1, -aspect], [1, -aspect], [1, aspect], [-1, aspect]], float)
    if kind == "triangle":
        t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], 1)
    if kind == "star":
        t = np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if kind == "hexagon":
        t = np.arange(6) * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], 1)
    w = 0.35  # cross
    return np.array(
        [
            [-w, -1],
            [w, -1],
            [w, -w],
            [1, -w],
            [1, w],
            [w, w],
            [w, 1],
            [-w, 1],
            [-w, w],
            [-1, w],
            [-1, -w],
            [-w, -w],
        ]
    )


def _polygon_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


class _Object:
    """One moving shape: geometry, trajectory and texture."""

    def __init__(
        self,
        rng: np.random.Generator,
        kind: str,
        texture: str | None,
        hue: float,
        h: int,
        w: int,
        mode: str,
        style: Style,
    ):
        self.unit = _unit_shape(kind, rng)
        area = rng.uniform(style.min_area, style.max_area) * h * w
        self.scale = math.sqrt(area / _polygon_area(self.unit))
        self.scale_wobble = (rng.uniform(0.0, 0.1), rng.uniform(0.05, 0.2), rng.uniform(0, 2 * np.pi))
        self.angle = rng.uniform(0, 2 * np.pi)
        self.spin = rng.uniform(-0.15, 0.15)
        speed = rng.uniform(2.0, 0.025 * (h + w))
        heading = rng.uniform(0, 2 * np.pi)
        self.vel = speed * np.array([np.cos(heading), np.sin(heading)])
        margin = 0.6 * self.scale
        self.pos = np.array(
            [rng.uniform(margin, max(margin, w - margin)), rng.uniform(margin, max(margin, h - margin))]
        )
        self.bounce = mode == "stay"
        if mode == "enter":  # start outside a random edge, heading for the middle
            edge = rng.integers(4)
            start = [
                (-1.2 * self.scale, rng.uniform(0, h)),
                (w + 1.2 * self.scale, rng.uniform(0, h)),
                (rng.uniform(0, w), -1.2 * self.scale),
                (rng.uniform(0, w), h + 1.2 * self.scale),
            ][edge]
            self.pos = np.array(start, float)
            target = np.array([rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h])
            d = target - self.pos
            self.vel = speed * d / np.linalg.norm(d)
        self.texture = texture
        self.colors = (_hsv_to_rgb(hue, 0.85, 0.95), _hsv_to_rgb(hue + 0.08, 0.9, 0.45))
        self.period = rng.uniform(6.0, 14.0)
        self.h, self.w = h, w

    def step(self) -> None:
        self.pos = self.pos + self.vel
        self.angle += self.spin
        if self.bounce:
            for axis, limit in ((0, self.w), (1, self.h)):
                if not 0 <= self.pos[axis] <= limit:
                    self.vel[axis] = -self.vel[axis]
                    self.pos[axis] = np.clip(self.pos[axis], 0, limit)

    def polygon(self, t: int) -> np.ndarray:
        amp, freq, phase = self.scale_wobble
        s = self.scale * (1 + amp * math.sin(freq * t + phase))
        c, si = math.cos(self.angle), math.sin(self.angle)
        rot = np.array([[c, -si], [si, c]])
        return self.pos + s * self.unit @ rot.T

    def mask(self, t: int) -> np.ndarray:
        img = Image.new("L", (self.w, self.h), 0)
        ImageDraw.Draw(img).polygon([tuple(p) for p in self.polygon(t)], fill=1)
        return np.asarray(img, bool)

    def paint(self, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        """The texture over the whole frame [H, W, 3], in the object's own (moving, rotating) frame."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = (xx - self.pos[0]) * c + (yy - self.pos[1]) * s
        v = -(xx - self.pos[0]) * s + (yy - self.pos[1]) * c
        p = self.period
        if self.texture is None:
            return np.broadcast_to(self.colors[0], (*xx.shape, 3))
        if self.texture == "stripes":
            pick = np.sin(u * 2 * np.pi / p) > 0
        elif self.texture == "checker":
            pick = (np.floor(u / p) + np.floor(v / p)) % 2 == 0
        elif self.texture == "dots":
            pick = ((u % p) - p / 2) ** 2 + ((v % p) - p / 2) ** 2 > (0.3 * p) ** 2
        else:
            pick = np.sin(np.hypot(u, v) * 2 * np.pi / p) > 0
        return np.where(pick[..., None], self.colors[0], self.colors[1])


def _background(rng: np.random.Generator, h: int, w: int, frames: int) -> list[np.ndarray]:
    """Muted, slowly panning textured backgrounds [H, W, 3] float, one per frame."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = _hsv_to_rgb(rng.uniform(), rng.uniform(0.1, 0.3), rng.uniform(0.35, 0.6))
    waves = [
        (rng.uniform(0.01, 0.08), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi), rng.uniform(8, 22))
        for _ in range(5)
    ]
    tint = rng.normal(0, 1, 3)
    pan = rng.uniform(-1.5, 1.5, 2)
    noise = rng.normal(0, 6, (h, w, 1))
    # Panning shifts each wave's phase by a constant per frame: sin(A + B) = sin A cos B + cos A sin B
    # with A the still wave [H, W], computed once, and B a number per frame.
    still = [(a, f * (xx * np.cos(d) + yy * np.sin(d)) + ph) for f, d, ph, a in waves]
    sin_cos = [(a * np.sin(phase), a * np.cos(phase)) for a, phase in still]
    drift = [f * (pan[0] * np.cos(d) + pan[1] * np.sin(d)) for f, d, _, _ in waves]
    colour = 1 + 0.15 * tint
    out = []
    for t in range(frames):
        field = sum(s * np.cos(v * t) + c * np.sin(v * t) for (s, c), v in zip(sin_cos, drift, strict=True))
        ramp = 0.05 * (xx + pan[0] * t - w / 2)
        out.append(base + field[..., None] * colour + noise + ramp[..., None])
    return out


def _compose(
    background: np.ndarray, objects: Sequence[_Object], depth: np.ndarray, t: int
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Paint `objects` over `background` [H, W, 3] float in `depth` order (later covers earlier) at
    time `t`: the picture [H, W, 3] uint8, each object's full and modal (visible) masks [H, W] bool."""
    h, w = background.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = background
    full = [o.mask(t) for o in objects]
    for k in depth:
        img = np.where(full[k][..., None], objects[k].paint(xx, yy), img)
    visible = []
    for k in range(len(objects)):
        above = [full[j] for j in depth[list(depth).index(k) + 1 :]]
        visible.append(full[k] & ~np.any(above, axis=0) if above else full[k])
    return np.clip(img, 0, 255).astype(np.uint8), full, visible


def make_video(
    seed: int,
    index: int,
    *,
    num_frames: int = 24,
    height: int = 240,
    width: int = 320,
    style: Style = Style(),
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Frames [num_frames] of [H, W, 3] uint8 and modal masks [num_frames][objects] of [H, W] bool.

    Every object is visible somewhere, and at least one is visible on frame 0.
    """
    for attempt in range(100):
        rng = np.random.default_rng([seed, index, attempt])
        n = int(rng.integers(1, 4))
        kinds = rng.choice(len(SHAPES), n, replace=False)
        textures = rng.choice(len(TEXTURES), n, replace=n > len(TEXTURES))
        hue0 = rng.uniform()
        modes = ["stay"] + [
            str(rng.choice(["stay", "enter", "leave"], p=[0.5, 0.25, 0.25])) for _ in range(n - 1)
        ]
        objects = [
            _Object(
                rng,
                SHAPES[k],
                TEXTURES[x] if style.textured else None,
                hue0 + i / n,
                height,
                width,
                mode,
                style,
            )
            for i, (k, x, mode) in enumerate(zip(kinds, textures, modes, strict=True))
        ]
        depth = rng.permutation(n)  # paint order: later covers earlier
        backgrounds = _background(rng, height, width, num_frames)
        frames, masks = [], []
        for t in range(num_frames):
            frame, _, visible = _compose(backgrounds[t], objects, depth, t)
            frames.append(frame)
            masks.append(visible)
            for o in objects:
                o.step()
        seen = np.array([[m.any() for m in frame] for frame in masks])
        if seen[0].any() and seen.any(axis=0).all():
            return frames, masks
    raise RuntimeError(f"could not draw a valid synthetic video for seed {seed}, index {index}")


def sav_json(video_id: str, masks: Sequence[Sequence[np.ndarray]], fps: float = 24.0) -> dict:
    """The SA-V `<video>_manual.json` record of modal masks [annotated frame][object]."""
    h, w = masks[0][0].shape
    n = len(masks[0])
    rles = [[encode_mask(m) for m in frame] for frame in masks]
    areas = np.array([[rle_area(r) for r in frame] for frame in rles], float)
    seen = areas > 0
    mean_area = [float(areas[seen[:, k], k].mean()) if seen[:, k].any() else 0.0 for k in range(n)]
    toggles = [
        int(np.abs(np.diff(seen[int(np.argmax(seen[:, k])) :, k].astype(int))).sum()) for k in range(n)
    ]
    frame_count = ANN_EVERY * (len(masks) - 1) + 1
    return {
        "video_id": video_id,
        "video_duration": frame_count / fps,
        "video_frame_count": float(frame_count),
        "video_height": float(h),
        "video_width": float(w),
        "video_resolution": float(h * w),
        "video_environment": "Synthetic",
        "video_split": "train",
        "masklet": rles,
        "masklet_id": list(range(n)),
        "masklet_size_rel": [a / (h * w) for a in mean_area],
        "masklet_size_abs": mean_area,
        "masklet_size_bucket": [
            "small" if a < 32**2 else "medium" if a < 96**2 else "large" for a in mean_area
        ],
        "masklet_visibility_changes": toggles,
        "masklet_first_appeared_frame": [float(np.argmax(seen[:, k])) for k in range(n)],
        "masklet_frame_count": [len(masks)] * n,
        "masklet_edited_frame_count": [0] * n,
        "masklet_type": ["manual"] * n,
        "masklet_stability_score": [None] * n,
        "masklet_num": n,
    }


def _write_last(path: Path, record: dict) -> None:
    """Write an annotation JSON in one rename, after the frames or image it describes: a generation
    cut short never leaves an annotation whose pictures are missing."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def video_name(index: int) -> str:
    return f"syn_{index:06d}"


def write_video(
    output_dir: str | Path,
    index: int,
    *,
    seed: int = 0,
    num_frames: int = 24,
    height: int = 240,
    width: int = 320,
    style: Style = Style(),
) -> str:
    """Generate and write video `index`; returns its name."""
    out = Path(output_dir)
    name = video_name(index)
    frames, masks = make_video(seed, index, num_frames=num_frames, height=height, width=width, style=style)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{ANN_EVERY * t:05d}.jpg", quality=95)
    _write_last(out / f"{name}_manual.json", sav_json(name, masks))
    return name


def make_synthetic(
    output_dir: str | Path,
    num_videos: int = 8,
    *,
    seed: int = 0,
    num_frames: int = 24,
    height: int = 240,
    width: int = 320,
    style: Style = Style(),
    progress: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Write `num_videos` synthetic SA-V videos under `output_dir`; returns their names.

    on_progress: called with the number of videos written so far, after each one."""
    names = []

    def write(i: int) -> str:
        return write_video(
            output_dir, i, seed=seed, num_frames=num_frames, height=height, width=width, style=style
        )

    # numpy and PIL release the GIL for most of a video's work: threads on every core.
    with (
        progress_bar(num_videos, "synthetic videos", unit="video", enabled=progress) as bar,
        ThreadPoolExecutor(os.cpu_count()) as pool,
    ):
        for name in pool.map(write, range(num_videos)):
            names.append(name)
            bar.update()
            if on_progress is not None:
                on_progress(len(names))
    return names


# --------------------------------------------------------------------------------------------------
# SA-1B-format images

SA1B_KINDS = ("object", "part", "speck", "background")
# Predicted IoU and stability ranges per kind of mask: SAM's automatic masks of whole objects score
# high, parts and specks lower, so the reader's filters have something to tell apart.
_SCORE_RANGES = {
    "object": ((0.8, 1.0), (0.85, 1.0)),
    "part": ((0.7, 0.95), (0.75, 0.97)),
    "speck": ((0.6, 0.8), (0.6, 0.85)),
    "background": ((0.75, 0.95), (0.8, 0.98)),
}


@dataclass(frozen=True)
class SyntheticImage:
    """One generated SA-1B-style image and its masks, in annotation order.

    `kinds[k]` (one of `SA1B_KINDS`) says what mask k is: an object's modal mask, a part (a half) of
    an object's modal mask, a speck of a few pixels painted on the background, or the background;
    `owners[k]` is the object (index into the image's objects) of an object or part mask, else -1.
    """

    image: np.ndarray  # [H, W, 3] uint8
    masks: np.ndarray  # [K, H, W] bool
    kinds: tuple[str, ...]
    owners: tuple[int, ...]
    predicted_iou: np.ndarray  # [K] float64
    stability_score: np.ndarray  # [K] float64


def _speck(rng: np.random.Generator, free: np.ndarray) -> np.ndarray | None:
    """A 2x2 or 3x3 square mask [H, W] bool lying wholly on `free` pixels, or None where none fits."""
    s = int(rng.integers(2, 4))
    h, w = free.shape
    fits = np.ones((h - s + 1, w - s + 1), bool)
    for dy in range(s):
        for dx in range(s):
            fits &= free[dy : dy + h - s + 1, dx : dx + w - s + 1]
    ys, xs = np.nonzero(fits)
    if not ys.size:
        return None
    j = int(rng.integers(ys.size))
    mask = np.zeros_like(free)
    mask[ys[j] : ys[j] + s, xs[j] : xs[j] + s] = True
    return mask


def _half(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """The part of `mask` [H, W] bool on one side of a random line through its centroid."""
    ys, xs = np.nonzero(mask)
    theta = rng.uniform(0, 2 * np.pi)
    side = (xs - xs.mean()) * math.cos(theta) + (ys - ys.mean()) * math.sin(theta) >= 0
    half = np.zeros_like(mask)
    half[ys[side], xs[side]] = True
    return half


def make_image(
    seed: int, index: int, *, height: int = 240, width: int = 320, style: Style = Style()
) -> SyntheticImage:
    """Image `index` of an SA-1B-style set: 3-8 of the video generator's shapes on its textured
    background, annotated like SA-1B with each object's modal mask, a part of 1-2 objects (nested in
    their wholes), a speck of 4-9 pixels and the background, in a shuffled order.

    Objects of an image of n > 4 shapes are drawn at 4/n of `style`'s areas so that they fit; every
    object shows at least a quarter of itself. A pure function of (seed, index, style) like
    `make_video`, from its own random stream.
    """
    for attempt in range(100):
        rng = np.random.default_rng([seed, index, attempt, 1])  # 1: not the videos' stream
        n = int(rng.integers(3, 9))
        kinds = rng.choice(len(SHAPES), n, replace=n > len(SHAPES))
        textures = rng.choice(len(TEXTURES), n, replace=n > len(TEXTURES))
        hue0 = rng.uniform()
        shrink = min(1.0, 4 / n)
        sized = replace(style, min_area=style.min_area * shrink, max_area=style.max_area * shrink)
        objects = [
            _Object(
                rng,
                SHAPES[k],
                TEXTURES[x] if style.textured else None,
                hue0 + i / n,
                height,
                width,
                "stay",
                sized,
            )
            for i, (k, x) in enumerate(zip(kinds, textures, strict=True))
        ]
        depth = rng.permutation(n)
        background = _background(rng, height, width, 1)[0]
        image, full, visible = _compose(background, objects, depth, 0)
        shown = np.array([v.sum() for v in visible])
        if (shown < np.maximum(16, 0.25 * np.array([f.sum() for f in full]))).any():
            continue
        free = ~np.any(visible, axis=0)
        speck = _speck(rng, free)
        if speck is None:
            continue
        image = image.copy()
        image[speck] = np.clip(_hsv_to_rgb(rng.uniform(), 0.3, 1.0), 0, 255).astype(np.uint8)
        masks = list(visible)
        kinds_of = ["object"] * n
        owners = list(range(n))
        for k in rng.choice(n, int(rng.integers(1, 3)), replace=False):
            half = _half(rng, visible[k])
            if 0 < half.sum() < visible[k].sum():
                masks.append(half)
                kinds_of.append("part")
                owners.append(int(k))
        masks += [speck, free & ~speck]
        kinds_of += ["speck", "background"]
        owners += [-1, -1]
        iou = np.array([rng.uniform(*_SCORE_RANGES[kind][0]) for kind in kinds_of])
        stability = np.array([rng.uniform(*_SCORE_RANGES[kind][1]) for kind in kinds_of])
        order = rng.permutation(len(masks))
        return SyntheticImage(
            image=image,
            masks=np.stack(masks)[order],
            kinds=tuple(kinds_of[j] for j in order),
            owners=tuple(owners[j] for j in order),
            predicted_iou=iou[order],
            stability_score=stability[order],
        )
    raise RuntimeError(f"could not draw a valid synthetic image for seed {seed}, index {index}")


def sa1b_json(
    image_id: int,
    masks: np.ndarray,
    predicted_iou: Sequence[float],
    stability_score: Sequence[float],
) -> dict:
    """The `sa_<image_id>.json` record of masks [K, H, W] bool (K > 0, none empty) and their scores."""
    h, w = masks.shape[1:]
    annotations = []
    for k, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        # The prompt point: the mask's pixel nearest its centroid (always inside, unlike the centroid).
        j = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
        x0, y0 = int(xs.min()), int(ys.min())
        annotations.append(
            {
                "id": image_id * 1000 + k,
                "segmentation": encode_mask(mask),
                "area": int(ys.size),
                "bbox": [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)],
                "predicted_iou": float(predicted_iou[k]),
                "point_coords": [[float(xs[j]), float(ys[j])]],
                "crop_box": [0.0, 0.0, float(w), float(h)],
                "stability_score": float(stability_score[k]),
            }
        )
    image = {"image_id": image_id, "width": int(w), "height": int(h), "file_name": f"sa_{image_id}.jpg"}
    return {"image": image, "annotations": annotations}


def image_name(index: int) -> str:
    """The SA-1B name of image `index` (0-based): SA-1B numbers its images from 1."""
    return f"sa_{index + 1}"


def write_image(
    output_dir: str | Path,
    index: int,
    *,
    seed: int = 0,
    height: int = 240,
    width: int = 320,
    style: Style = Style(),
) -> str:
    """Generate and write image `index` as `sa_<index + 1>.jpg` and `.json`; returns its name."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = image_name(index)
    made = make_image(seed, index, height=height, width=width, style=style)
    Image.fromarray(made.image).save(out / f"{name}.jpg", quality=95)
    record = sa1b_json(index + 1, made.masks, made.predicted_iou, made.stability_score)
    _write_last(out / f"{name}.json", record)
    return name


def make_sa1b(
    output_dir: str | Path,
    images: int,
    *,
    seed: int = 0,
    height: int = 240,
    width: int = 320,
    style: Style = Style(),
    progress: bool = False,
) -> list[str]:
    """Write `images` synthetic SA-1B-format images under `output_dir`; returns their names."""
    names = []
    with progress_bar(images, "synthetic images", unit="image", enabled=progress) as bar:
        for i in range(images):
            names.append(write_image(output_dir, i, seed=seed, height=height, width=width, style=style))
            bar.update()
    return names
