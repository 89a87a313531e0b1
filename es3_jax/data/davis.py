"""DAVIS 2017 on disk: its layout, its palette-PNG objects, the semi-supervised prompts of an evaluation
video, and a split indexed as training videos.

Layout::

    <root>/JPEGImages/480p/<seq>/00000.jpg ...
    <root>/Annotations/480p/<seq>/00000.png ...   palette PNG: id per pixel, 0 background, 255 void
    <root>/ImageSets/2017/<split>.txt             sequence names (else: every annotation folder)

An object is a palette id; 255 is void, not an object. The semi-supervised prompt of a video is the GT
masks of frame 0, one per id present there (the DAVIS protocol prompts frame 0 only). For training every
frame is annotated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from es3_jax.data.frames import FrameError
from es3_jax.data.masks import MaskFileError, read_palette_png
from es3_jax.data.source import PipelineError, StoreVideos
from es3_jax.data.video_source import VideoSource
from es3_jax.data.videos import (
    DatasetError,
    Problem,
    Prompt,
    VideoEntry,
    VosVideo,
    numbered_frame_stems,
    require_dirs,
    split_sequences,
)

if TYPE_CHECKING:
    from es3_jax.config import Config

DAVIS_VOID = 255


def dataset_dirs(root: str | Path, resolution: str = "480p") -> tuple[Path, Path]:
    """(frames folder, annotations folder) of a DAVIS root; DatasetError when either is missing."""
    root = Path(root)
    frames, annotations = root / "JPEGImages" / resolution, root / "Annotations" / resolution
    require_dirs("davis", root, frames, annotations)
    return frames, annotations


def list_sequences(root: str | Path, split: str = "val", resolution: str = "480p") -> list[str]:
    """Sequence names of a split: from `ImageSets/2017/<split>.txt` when the root has it, else every
    annotation folder."""
    root = Path(root)
    _, annotations = dataset_dirs(root, resolution)
    return split_sequences(root / "ImageSets" / "2017" / f"{split}.txt", annotations)


def read_davis_objects(path: str | Path) -> dict[int, np.ndarray]:
    """A DAVIS palette PNG -> {object id: [H, W] bool} for every id present except 0 and void (255)."""
    labels = read_palette_png(path)
    ids = [int(i) for i in np.unique(labels) if i not in (0, DAVIS_VOID)]
    return {i: labels == i for i in ids}


class DavisVideo(VosVideo):
    """A DAVIS evaluation video: one palette PNG of object ids per frame."""

    layout = "davis"

    def annotation_files(self) -> list[Path]:
        return sorted(self.annotation_dir.glob("*.png"))

    def prompts(self) -> list[Prompt]:
        """The GT masks of frame 0, by object id; objects that appear later are not prompted."""
        first = self.annotation_dir / f"{self.frame_names[0]}.png"
        if not first.is_file():
            raise DatasetError(f"{self.name}: no annotation for the first frame ({first})")
        return [Prompt(0, obj, mask) for obj, mask in read_davis_objects(first).items()]


def scan_davis(
    root: str | Path,
    split: str = "train",
    *,
    frame_stems: Callable[[str], Sequence[str] | None] | None = None,
) -> tuple[list[VideoEntry], list[Problem]]:
    """Index a DAVIS 2017 split as training videos: entries of the usable sequences and the problems found.

    Every frame is annotated; objects are the palette ids other than 0 and void. Frames are the JPEGs,
    or `frame_stems(seq)` (e.g. the embedding store's frame names; `None` means no frames).
    """
    frames_dir, ann_dir = dataset_dirs(root)
    entries, problems = [], []
    for name in list_sequences(root, split):
        pngs = sorted((ann_dir / name).glob("*.png"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
        if not pngs:
            problems.append(Problem(name, "no annotation PNGs"))
            continue
        try:
            stems = frame_stems(name) if frame_stems else numbered_frame_stems(frames_dir / name)
        except FrameError as e:
            problems.append(Problem(name, str(e)))
            continue
        if not stems:
            problems.append(Problem(name, "no frames"))
            continue
        try:
            ids = [read_palette_png(p) for p in pngs]
        except MaskFileError as e:
            problems.append(Problem(name, str(e)))
            continue
        shapes = {m.shape for m in ids}
        if len(shapes) > 1:
            problems.append(Problem(name, f"annotation PNGs differ in size: {sorted(shapes)}"))
            continue
        by_number = {int(s): (i, s) for i, s in enumerate(stems) if s.isdigit()}
        numbers = np.array([int(p.stem) for p in pngs], np.int64)
        missing = [int(f) for f in numbers if int(f) not in by_number]
        if missing:
            problems.append(
                Problem(name, f"{len(missing)} annotated frames have no frame, e.g. {missing[0]:05d}")
            )
            continue
        objects = tuple(int(i) for i in np.unique(np.stack(ids)) if i not in (0, DAVIS_VOID))
        if not objects:
            problems.append(Problem(name, "no object in any annotation"))
            continue
        height, width = shapes.pop()
        entries.append(
            VideoEntry(
                name=name,
                source="davis",
                annotation=tuple(str(p) for p in pngs),
                stems=tuple(by_number[int(f)][1] for f in numbers),
                frame_numbers=numbers,
                frame_positions=np.array([by_number[int(f)][0] for f in numbers], np.int64),
                visible=np.array([[(m == k).any() for k in objects] for m in ids], bool),
                objects=objects,
                height=height,
                width=width,
                frames_dir=str(frames_dir / name),
            )
        )
    return entries, problems


def load_masks(entry: VideoEntry, positions: Sequence[int], objects: Sequence[int]) -> np.ndarray:
    """Ground-truth masks of kept objects `objects` (indices into `entry.objects`) on annotated frames
    `positions` [T, O, H, W] uint8, read from the entry's palette PNGs."""
    ids = np.array([entry.objects[o] for o in objects])
    return np.stack(
        [
            (read_palette_png(entry.annotation[p])[None] == ids[:, None, None]).astype(np.uint8)
            for p in positions
        ]
    )


@dataclass(frozen=True)
class DavisSource(VideoSource):
    """DAVIS 2017 as a `DatasetSource`: the "train" split of DATA.DAVIS_ROOT for training, the
    videos of a val/test root for evaluation."""

    name: ClassVar[str] = "davis"
    default: ClassVar[bool] = True
    root_key: ClassVar[str] = "DATA.DAVIS_ROOT"

    root: str = ""

    @classmethod
    def from_config(cls, cfg: Config) -> DavisSource:
        return cls(cfg.DATA.DAVIS_ROOT)

    def configured(self, store: StoreVideos | None) -> bool:
        return bool(self.root)

    def index(self, store: StoreVideos | None, progress: bool) -> tuple[list[VideoEntry], list[Problem]]:
        if not self.root:
            raise PipelineError(f"DATA.SOURCES lists {self.name} but {self.root_key} is empty")
        entries, problems = scan_davis(self.root, "train", frame_stems=None if store is None else store.stems)
        if store is not None:
            store.claim([e.name for e in entries] + [p.video for p in problems])
        return entries, problems

    def load_masks(self, entry: VideoEntry, positions: Sequence[int], objects: Sequence[int]) -> np.ndarray:
        return load_masks(entry, positions, objects)

    @classmethod
    def dataset_dirs(cls, root: str | Path, resolution: str) -> tuple[Path, Path]:
        return dataset_dirs(root, resolution)

    @classmethod
    def list_sequences(cls, root: str | Path, split: str, resolution: str) -> list[str]:
        return list_sequences(root, split, resolution)

    @classmethod
    def open_video(cls, name: str, frame_paths: Sequence[Path], annotation_dir: Path) -> DavisVideo:
        return DavisVideo(name, tuple(frame_paths), annotation_dir)
