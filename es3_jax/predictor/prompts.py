"""Prompts on the host: what a user's mask, clicks or box become before the model sees them, and
what each object's prompt on a frame keeps.

Plain numpy, the tracking session's (`es3_jax.predictor.session`): every engine gets the same
model inputs from the same prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from es3_jax.errors import Es3Error
from es3_jax.interpolation import resize_bilinear
from es3_jax.logits import NO_OBJ_SCORE

# Upstream keeps only the first 8 and the last 8 clicks of a long click sequence.
MAX_POINTS = 16


class PredictorError(Es3Error):
    """A call a tracker cannot honour (bad prompt, unknown object, missing input); says why."""


@dataclasses.dataclass
class Prompt:
    """One object's prompt on one frame and what the SAM heads made of it.

    kind "tracked": the object's own output of an earlier pass on a frame that a correction of
    another object turned into a conditioning frame (upstream consolidates every object's output
    on a prompted frame into its memory).
    """

    kind: str  # "mask", "points" or "tracked"
    low_res: np.ndarray  # [4g, 4g] consolidated logits (what the frame's memory is encoded from)
    video_res: np.ndarray | None  # [H, W] logits ±1024 for masks (carved by later masks), else None
    obj_ptr: np.ndarray  # [C]
    object_score: float
    iou: float
    coords: np.ndarray | None = None  # [P, 2] input-image pixels
    labels: np.ndarray | None = None  # [P]


Prompts = dict[int, dict[int, Prompt]]  # object index -> frame -> prompt


def copy_prompts(prompts: Prompts) -> Prompts:
    """The prompts as they are now (later prompts change the dicts and rebind the fields of the
    prompts on the same frame, never an array in place)."""
    return {obj: {f: dataclasses.replace(p) for f, p in frames.items()} for obj, frames in prompts.items()}


def started(frames: dict[int, Prompt], frame: int, reverse: bool) -> bool:
    """Whether an object prompted on `frames` is tracked at `frame` (in the pass's direction)."""
    return any((f >= frame) if reverse else (f <= frame) for f in frames)


def low_res_of(video_res: np.ndarray, grid: int) -> np.ndarray:
    """Video-resolution logits `[H, W]` -> the low-res logits `[4g, 4g]` memory is encoded from."""
    return resize_bilinear(video_res[None], 4 * grid, 4 * grid, antialias=True)[0]


def mask_inputs(mask: np.ndarray, grid: int, video_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A user's mask `[h, w]` (bool or [0, 1], any size) -> (the mask at the memory encoder's mask
    size `[16g, 16g]`, what the SAM heads take; its logits ±1024 at video resolution `[H, W]`),
    both resized with antialiasing as upstream does."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise PredictorError(f"a mask prompt must be [H, W], got shape {mask.shape}")
    m = mask.astype(np.float32)[None]
    s = 16 * grid
    h, w = video_size
    inside = resize_bilinear(m, h, w, antialias=True)[0] > 0.5
    return resize_bilinear(m, s, s, antialias=True)[0], np.where(inside, -NO_OBJ_SCORE, NO_OBJ_SCORE).astype(
        np.float32
    )


def carve(prompts: Prompts, frame: int, obj: int, video_res: np.ndarray, grid: int) -> None:
    """Where object `obj`'s new mask on `frame` covers the mask prompts other objects have there, the
    new mask wins: theirs become NO_OBJ_SCORE there (and their low-res logits follow)."""
    inside = video_res > 0
    for other, frames in prompts.items():
        p = frames.get(frame)
        if other != obj and p is not None and p.video_res is not None:
            p.video_res = np.where(inside, NO_OBJ_SCORE, p.video_res).astype(np.float32)
            p.low_res = low_res_of(p.video_res, grid)


def click_inputs(
    points: np.ndarray | Sequence | None,
    labels: np.ndarray | Sequence | None,
    box: np.ndarray | Sequence | None,
    *,
    image_size: int,
    video_size: tuple[int, int],
    previous: Prompt | None,
    clear_old_points: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Clicks `[P, 2]` (x, y video pixels) with labels `[P]` and/or a box (x0, y0, x1, y1) -> the
    prompt encoder's (coords `[N, 2]` input-image pixels, labels `[N]` int32), as upstream builds
    them: the box first as two corners (labels 2, 3), the frame's earlier clicks ahead of new ones
    unless `clear_old_points`, at most the first 8 and the last 8 clicks."""
    if (points is None) != (labels is None):
        raise PredictorError("points and labels must be given together")
    if points is None and box is None:
        raise PredictorError("give points (with labels) or a box")
    if box is not None and not clear_old_points:
        raise PredictorError("a box must come first: use clear_old_points=True with a box")
    h, w = video_size
    scale = np.array([image_size / w, image_size / h], np.float32)
    coords = np.zeros((0, 2), np.float32) if points is None else np.asarray(points, np.float32).reshape(-1, 2)
    labs = np.zeros((0,), np.int32) if labels is None else np.asarray(labels, np.int32).reshape(-1)
    if len(coords) != len(labs):
        raise PredictorError(f"{len(coords)} points but {len(labs)} labels")
    coords = coords * scale
    if box is not None:
        corners = np.asarray(box, np.float32).reshape(2, 2) * scale
        coords = np.concatenate([corners, coords])
        labs = np.concatenate([np.array([2, 3], np.int32), labs])
    if not clear_old_points and previous is not None and previous.coords is not None:
        coords = np.concatenate([previous.coords, coords])
        labs = np.concatenate([previous.labels, labs])
    if len(coords) > MAX_POINTS:
        half = MAX_POINTS // 2
        keep = np.r_[0:half, len(coords) - (MAX_POINTS - half) : len(coords)]
        coords, labs = coords[keep], labs[keep]
    return coords, labs


def frame_prompt_logits(
    prompts: Prompts, frame: int, num_objects: int, video_size: tuple[int, int]
) -> np.ndarray:
    """Every object's prompt on `frame` at video resolution `[O, H, W]` (NO_OBJ_SCORE where it has none)."""
    h, w = video_size
    out = np.full((num_objects, h, w), NO_OBJ_SCORE, np.float32)
    for obj, frames in prompts.items():
        p = frames.get(frame)
        if p is not None:
            out[obj] = p.video_res if p.video_res is not None else resize_bilinear(p.low_res[None], h, w)[0]
    return out
