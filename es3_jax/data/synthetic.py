"""Synthetic SA-V-format videos: textured shapes that move, rotate, occlude each other, enter and leave.

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
from collections.abc import Sequence
from dataclasses import dataclass
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
    out = []
    for t in range(frames):
        x, y = xx + pan[0] * t, yy + pan[1] * t
        field = sum(a * np.sin(f * (x * np.cos(d) + y * np.sin(d)) + ph) for f, d, ph, a in waves)
        out.append(base + field[..., None] * (1 + 0.15 * tint) + noise + 0.05 * (x[..., None] - w / 2))
    return out


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
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
        frames, masks = [], []
        for t in range(num_frames):
            img = backgrounds[t]
            full = [o.mask(t) for o in objects]
            for k in depth:
                img = np.where(full[k][..., None], objects[k].paint(xx, yy), img)
            visible = []
            for k in range(n):
                above = [full[j] for j in depth[list(depth).index(k) + 1 :]]
                visible.append(full[k] & ~np.any(above, axis=0) if above else full[k])
            frames.append(np.clip(img, 0, 255).astype(np.uint8))
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
    tmp = out / f".{name}_manual.json.tmp"
    tmp.write_text(json.dumps(sav_json(name, masks)))
    tmp.replace(out / f"{name}_manual.json")  # the annotation appears last, when the frames are complete
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
) -> list[str]:
    """Write `num_videos` synthetic SA-V videos under `output_dir`; returns their names."""
    names = []
    with progress_bar(num_videos, "synthetic videos", unit="video", enabled=progress) as bar:
        for i in range(num_videos):
            name = write_video(
                output_dir, i, seed=seed, num_frames=num_frames, height=height, width=width, style=style
            )
            names.append(name)
            bar.update()
    return names
