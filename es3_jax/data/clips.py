"""Training-clip sampling: SAM 2's `RandomUniformSampler`, as a pure function of (seed, epoch, index).

A clip is `num_frames` annotated frames spaced `frame_skip` 24-fps frames apart (4 = consecutive SA-V
annotated frames), played backwards with probability `reverse_prob`, with up to `max_objects`
objects that are visible on the clip's first frame (in playback order). SAM 2 retries random starts
until the first frame shows an object; drawing the start uniformly among the windows that qualify is
the same distribution without the retry loop, and it always terminates.

Epoch e visits the videos in the order `epoch_order(seed, e, n)`; slot j of epoch e samples its clip
with the generator `clip_rng(seed, e, j)`. Nothing depends on the process, the worker or what was
read before, so any process can rebuild any clip, and a resumed run sees exactly the same clips.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from es3_jax.data.videos import VideoEntry

_ORDER_STREAM = 0  # separates the per-epoch permutation stream from the per-clip streams
_CLIP_STREAM = 1


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    num_frames: int = 8
    frame_skip: int = 4  # 24-fps frames between consecutive clip frames
    max_objects: int = 3
    reverse_prob: float = 0.0


@dataclasses.dataclass(frozen=True)
class Clip:
    """One sampled clip: `positions` [T] index `entry.stems` in playback order; `objects` [O'] (O' <=
    max_objects, sorted) index `entry.objects`."""

    video: int
    positions: np.ndarray
    objects: np.ndarray
    reversed: bool


def clip_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of clip slot `index` of `epoch`."""
    return np.random.default_rng([_CLIP_STREAM, seed, epoch, index])


def epoch_order(seed: int, epoch: int, num_videos: int) -> np.ndarray:
    """Video visited by each slot of `epoch`: a permutation of range(num_videos) [N] int64."""
    return np.random.default_rng([_ORDER_STREAM, seed, epoch]).permutation(num_videos)


def windows(frame_numbers: np.ndarray, num_frames: int, frame_skip: int) -> np.ndarray:
    """Every run of `num_frames` annotated frames spaced `frame_skip` apart [W, T] (positions into
    `frame_numbers`, in time order)."""
    frame_numbers = np.asarray(frame_numbers)
    targets = frame_numbers[:, None] + frame_skip * np.arange(num_frames)[None, :]
    pos = np.searchsorted(frame_numbers, targets)
    inside = pos < len(frame_numbers)
    hit = inside & (frame_numbers[np.minimum(pos, len(frame_numbers) - 1)] == targets)
    return pos[hit.all(axis=1)]


def valid_windows(entry: VideoEntry, spec: ClipSpec, reverse: bool) -> np.ndarray:
    """The windows [W, T] whose first frame in playback order shows at least one object."""
    w = windows(entry.frame_numbers, spec.num_frames, spec.frame_skip)
    if reverse:
        w = w[:, ::-1]
    return w[entry.visible[w[:, 0]].any(axis=1)] if len(w) else w


def can_sample(entry: VideoEntry, spec: ClipSpec) -> bool:
    """Whether some clip of this video qualifies (in either direction)."""
    return len(valid_windows(entry, spec, False)) > 0 or len(valid_windows(entry, spec, True)) > 0


def sample_clip(entry: VideoEntry, spec: ClipSpec, rng: np.random.Generator, video: int = 0) -> Clip:
    """Draw one clip of `entry` (ValueError when no clip qualifies; filter with `can_sample` first)."""
    reverse = bool(rng.random() < spec.reverse_prob)
    w = valid_windows(entry, spec, reverse)
    if not len(w):  # only the other direction qualifies
        reverse = not reverse
        w = valid_windows(entry, spec, reverse)
    if not len(w):
        raise ValueError(
            f"{entry.name}: no clip of {spec.num_frames} frames at skip {spec.frame_skip} qualifies"
        )
    positions = w[rng.integers(len(w))]
    visible = np.flatnonzero(entry.visible[positions[0]])
    take = min(len(visible), spec.max_objects)
    objects = np.sort(rng.choice(visible, size=take, replace=False))
    return Clip(
        video=video, positions=positions.astype(np.int64), objects=objects.astype(np.int64), reversed=reverse
    )


def sample_epoch_clip(
    entries: Sequence[VideoEntry], spec: ClipSpec, seed: int, epoch: int, index: int
) -> Clip:
    """The clip of slot `index` (0 <= index < len(entries)) of `epoch`."""
    video = int(epoch_order(seed, epoch, len(entries))[index])
    return sample_clip(entries[video], spec, clip_rng(seed, epoch, index), video=video)


def eval_clip(entry: VideoEntry, spec: ClipSpec, video: int = 0) -> Clip:
    """The fixed validation clip of a video: its first qualifying forward window, every object visible
    on that window's first frame up to `max_objects` (lowest indices first)."""
    w = valid_windows(entry, spec, False)
    if not len(w):
        return sample_clip(
            entry, dataclasses.replace(spec, reverse_prob=1.0), np.random.default_rng(0), video
        )
    positions = w[0]
    objects = np.flatnonzero(entry.visible[positions[0]])[: spec.max_objects]
    return Clip(
        video=video, positions=positions.astype(np.int64), objects=objects.astype(np.int64), reversed=False
    )
