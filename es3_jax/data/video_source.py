"""The training half of a format of annotated videos (SA-V, DAVIS): clips sampled from a `VideoEntry`'s
annotated frames (`clips.py`), frames read from the video's JPEG folder, masks read by the format."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from es3_jax.data.clips import Clip, ClipSpec, can_sample, eval_clip, sample_clip
from es3_jax.data.frames import read_frame
from es3_jax.data.source import ClipArrays, PipelineError
from es3_jax.data.videos import VideoEntry

FRAME_EXTS = (".jpg", ".jpeg", ".JPG", ".JPEG", ".png")


def frame_path(folder: Path, stem: str) -> Path:
    """The frame file of `stem` in `folder`; PipelineError when there is none."""
    for ext in FRAME_EXTS:
        p = folder / f"{stem}{ext}"
        if p.exists():
            return p
    raise PipelineError(f"frame {stem} not found in {folder}")


class VideoSource(abc.ABC):
    """A `DatasetSource` whose entries are `VideoEntry`s; a subclass indexes and reads masks.

    `frames_root` holds `<video>/<stem>.jpg` for entries indexed without their JPEG folder (from the
    embedding store's frame names)."""

    frames_root: str = ""

    @abc.abstractmethod
    def load_masks(self, entry: VideoEntry, positions: Sequence[int], objects: Sequence[int]) -> np.ndarray:
        """Ground-truth masks of kept objects `objects` (indices into `entry.objects`) on annotated
        frames `positions` [T, O, H, W] uint8."""

    def usable(self, entry: VideoEntry, spec: ClipSpec) -> bool:
        return can_sample(entry, spec)

    def clip(self, entry: VideoEntry, spec: ClipSpec, video: int, rng: np.random.Generator | None) -> Clip:
        if rng is None:
            return eval_clip(entry, spec, video=video)
        return sample_clip(entry, spec, rng, video=video)

    def load(
        self, entry: VideoEntry, clip: Clip, spec: ClipSpec, rng: np.random.Generator, read_frames: bool
    ) -> ClipArrays:
        objects = clip.objects[: spec.max_objects]
        frames = None
        if read_frames:
            folder = Path(entry.frames_dir or Path(self.frames_root) / entry.name)
            frames = [read_frame(frame_path(folder, entry.stems[p])) for p in clip.positions]
        return ClipArrays(
            frames=frames,
            masks=self.load_masks(entry, clip.positions, objects) if len(objects) else None,
            object_ids=np.array([entry.objects[o] for o in objects], np.int64),
            frame_positions=entry.frame_positions[clip.positions],
            frame_numbers=entry.frame_numbers[clip.positions],
        )
