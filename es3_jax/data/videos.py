"""The records the dataset readers (`sav.py`, `davis.py`) share.

Training: `VideoEntry`, what the clip sampler and the pipeline need of one annotated video, and
`Problem`, why a video (or some of its objects) was left out of an index. Evaluation: `VosVideo`, one
video of a val/test root, and `Prompt`, one object's input mask. `DatasetError` is a dataset root
without the expected layout.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from es3_jax.data.frames import list_frames
from es3_jax.errors import Es3Error

JPEG_EXTS = (".jpg", ".jpeg")


class DatasetError(Es3Error):
    """A dataset folder that does not have the expected layout; the message names the path."""


@dataclass(frozen=True)
class Problem:
    """Why a video (or some of its objects) was left out of the index."""

    video: str
    reason: str
    skipped: bool = True  # False: the video is used, only some objects were dropped

    def __str__(self) -> str:
        return f"{self.video}: {self.reason}" + ("" if self.skipped else " (video kept)")


@dataclass(frozen=True)
class VideoEntry:
    """What the sampler and the pipeline need of one training video (small and picklable).

    `stems[a]` names annotated frame a (its JPEG stem and embedding-store frame name; the annotated
    frames the index kept, in time order),
    `frame_numbers[a]` is its frame number (24-fps index on SA-V), `frame_positions[a]` its position
    among all the frames of the frame source (the sorted JPEGs or the embedding store's frames),
    `visible[a, k]` whether kept object k has a non-empty mask there, and `objects[k]` is the object's
    id in the annotation (SA-V: its index, the manual objects then auto; DAVIS: its palette id).
    """

    name: str
    source: str  # the registry key of its format ("sav", "davis")
    annotation: tuple[str, ...]  # the file(s) the masks are read from
    stems: tuple[str, ...]
    frame_numbers: np.ndarray  # [A] int64
    frame_positions: np.ndarray  # [A] int64
    visible: np.ndarray  # [A, N] bool
    objects: tuple[int, ...]
    height: int
    width: int
    frames_dir: str = ""  # the video's JPEG folder, when it has one


@dataclass(frozen=True)
class Prompt:
    """One object's input mask: `mask` [H, W] bool on frame `frame_idx` (index into the video's frames)."""

    frame_idx: int
    obj_id: int
    mask: np.ndarray


@dataclass(frozen=True)
class VosVideo(abc.ABC):
    """One evaluation video: its frames in playback order and its GT annotation folder.

    Each dataset's reader subclasses it with its annotation `layout` and its semi-supervised prompts.
    """

    layout: ClassVar[str]  # "davis" (one palette PNG per frame) or "sav" (one folder of PNGs per object)
    name: str
    frame_paths: tuple[Path, ...]
    annotation_dir: Path

    @property
    def frame_names(self) -> list[str]:
        return [p.stem for p in self.frame_paths]

    def __len__(self) -> int:
        return len(self.frame_paths)

    @abc.abstractmethod
    def prompts(self) -> list[Prompt]:
        """The semi-supervised input masks, by frame then object id."""

    @abc.abstractmethod
    def annotation_files(self) -> list[Path]:
        """The GT mask PNGs, each named by its frame."""

    def unprompted_objects(self, prompted: set[int]) -> list[str]:
        """The objects of the GT (by the folder name the scorer knows them by) that no prompt in
        `prompted` tracks, when the layout scores objects apart; none where one file holds them all."""
        return []

    def check_frames(self) -> None:
        """DatasetError naming the first annotated frame whose JPEG is missing: tracking runs on the
        JPEGs there are, so the gap would only show when the missing frame's prediction is scored."""
        names = set(self.frame_names)
        for png in self.annotation_files():
            if png.stem not in names:
                folder = self.frame_paths[0].parent
                raise DatasetError(
                    f"{self.name}: frame {png.stem} is annotated ({png}) but has no JPEG in {folder}"
                )


def numbered_frame_stems(folder: str | Path) -> list[str]:
    """Stems of the JPEG frames of `folder` named by a frame number, sorted by that number.

    `frames.list_frames` narrowed to the frames a training annotation can address: SA-V and DAVIS
    name their JPEG frames by frame number and their masks refer to frames by that number, so an image
    with another name or of another type (a mask PNG written beside the frames) is not a dataset frame.
    FrameError when the folder is missing or holds no image.
    """
    paths = list_frames(folder)
    return sorted((p.stem for p in paths if p.suffix.lower() in JPEG_EXTS and p.stem.isdigit()), key=int)


def require_dirs(dataset: str, root: Path, *folders: Path) -> None:
    """DatasetError naming the first of `folders` (parts of a `dataset` root) that is not a folder."""
    for folder in folders:
        if not folder.is_dir():
            raise DatasetError(f"{dataset} root {root}: folder {folder} not found")


def split_sequences(split_file: Path, annotations: Path) -> list[str]:
    """Sequence names of a split: the lines of `split_file` when the root has one, else every folder
    of `annotations` (sorted)."""
    if split_file.is_file():
        return [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    return sorted(p.name for p in annotations.iterdir() if p.is_dir() and not p.name.startswith("."))
