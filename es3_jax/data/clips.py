"""Training-clip sampling: SAM 2's `RandomUniformSampler`, as a pure function of (seed, epoch, index).

A clip is `num_frames` annotated frames spaced `frame_skip` 24-fps frames apart (4 = consecutive SA-V
annotated frames), played backwards with probability `reverse_prob`, with up to `max_objects`
objects that are visible on the clip's first frame (in playback order). SAM 2 retries random starts
until the first frame shows an object; drawing the start uniformly among the windows that qualify is
the same distribution without the retry loop, and it always terminates.

Epoch e visits the videos in the order `epoch_order(seed, e, n)`; slot j of epoch e samples its clip
with the generator `clip_rng(seed, e, j)` and augments it with `augment_rng(seed, e, j)`. Nothing
depends on the process, the worker or what was read before, so any process can rebuild any clip, and
a resumed run sees exactly the same clips.

Several sources (SA-V, DAVIS, SA-1B) mix by weight (`mixed_epoch_order`): an epoch gives source s
exactly its share w_s of the slots (largest remainders), is as long as the first source to run out
allows without repeating an item (min over s of n_s / w_s slots), and interleaves the sources in a
random order; each source's items come in a fresh random order every epoch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from es3_jax.data.videos import VideoEntry

_ORDER_STREAM = 0  # separates the per-epoch permutation stream from the per-clip streams
_CLIP_STREAM = 1
_SOURCE_STREAM = 2  # which source each slot of an epoch draws from
_AUGMENT_STREAM = 3
_LOAD_STREAM = 4  # what a format draws as it loads a clip: objects and motion of an SA-1B pseudo-video


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


def augment_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of clip slot `index`'s augmentation."""
    return np.random.default_rng([_AUGMENT_STREAM, seed, epoch, index])


def load_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of what a format draws as it loads the clip of slot `index` (an SA-1B
    pseudo-video's objects and motion; validation: epoch 0, `index` the item's position, so a held-out
    image always makes the same clip)."""
    return np.random.default_rng([_LOAD_STREAM, seed, epoch, index])


def epoch_order(seed: int, epoch: int, num_videos: int) -> np.ndarray:
    """Video visited by each slot of `epoch`: a permutation of range(num_videos) [N] int64."""
    return np.random.default_rng([_ORDER_STREAM, seed, epoch]).permutation(num_videos)


def source_quotas(sizes: Sequence[int], weights: Sequence[float]) -> np.ndarray:
    """Slots per epoch of each source [S] int64: shares `weights` (normalised) of
    min(n_s / w_s) slots, rounded by largest remainders so they sum to that length."""
    w = np.asarray(weights, np.float64) / np.sum(weights)
    n = np.asarray(sizes, np.float64)
    length = int(np.floor(np.min(n / w) + 1e-9))
    exact = w * length
    quotas = np.floor(exact + 1e-9).astype(np.int64)
    short = length - int(quotas.sum())
    quotas[np.argsort(-(exact - quotas), kind="stable")[:short]] += 1
    return np.minimum(quotas, np.asarray(sizes, np.int64))


def mixed_epoch_order(
    seed: int, epoch: int, sizes: Sequence[int], weights: Sequence[float]
) -> np.ndarray:
    """Item visited by each slot of `epoch` [E] int64, indexing the sources' items laid end to end
    (source 0's n_0 items, then source 1's, ...). One source: `epoch_order`."""
    if len(sizes) == 1:
        return epoch_order(seed, epoch, sizes[0])
    quotas = source_quotas(sizes, weights)
    which = np.random.default_rng([_SOURCE_STREAM, seed, epoch]).permutation(
        np.repeat(np.arange(len(sizes)), quotas)
    )
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    order = np.empty(len(which), np.int64)
    for s, (n, q) in enumerate(zip(sizes, quotas, strict=True)):
        items = np.random.default_rng([_ORDER_STREAM, seed, epoch, s]).permutation(n)[:q]
        order[which == s] = offsets[s] + items
    return order


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


def image_clip(spec: ClipSpec, video: int) -> Clip:
    """The clip of a still image (an SA-1B pseudo-video): its objects are drawn when it is loaded,
    from its annotation."""
    return Clip(
        video=video,
        positions=np.zeros(spec.num_frames, np.int64),
        objects=np.zeros(0, np.int64),
        reversed=False,
    )


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
