"""VOS evaluation datasets on disk: DAVIS 2017 and SA-V val/test.

DAVIS 2017::

    <root>/JPEGImages/480p/<seq>/00000.jpg ...
    <root>/Annotations/480p/<seq>/00000.png ...   palette PNG: id per pixel, 0 background, 255 void
    <root>/ImageSets/2017/<split>.txt             sequence names (else: every annotation folder)

SA-V val/test::

    <root>/JPEGImages_24fps/<video>/00000.jpg ...           every 24-fps frame
    <root>/Annotations_6fps/<video>/<obj:03d>/00000.png ...  one binary PNG per object per annotated frame
    <root>/sav_<split>.txt                                  video names (else: every annotation folder)

The semi-supervised prompt of a video (`VosVideo.prompts`): on DAVIS, the GT masks of frame 0, one per
id present there (255 is void, not an object); on SA-V, each object's mask on the first annotated frame
where it is non-empty, so an object may join after frame 0. An SA-V object id is its folder number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from es3_jax.data.frames import list_frames
from es3_jax.data.masks import read_palette_png
from es3_jax.errors import Es3Error

DATASETS = ("davis", "sav")
DAVIS_VOID = 255


class DatasetError(Es3Error):
    """A dataset folder that does not have the expected layout; the message names the path."""


@dataclass(frozen=True)
class Prompt:
    """One object's input mask: `mask` [H, W] bool on frame `frame_idx` (index into the video's frames)."""

    frame_idx: int
    obj_id: int
    mask: np.ndarray


@dataclass(frozen=True)
class VosVideo:
    """One evaluation video: its frames in playback order and its GT annotation folder."""

    name: str
    layout: str  # "davis" (one palette PNG per frame) or "sav" (one folder of binary PNGs per object)
    frame_paths: tuple[Path, ...]
    annotation_dir: Path

    @property
    def frame_names(self) -> list[str]:
        return [p.stem for p in self.frame_paths]

    def __len__(self) -> int:
        return len(self.frame_paths)

    def object_dirs(self) -> list[Path]:
        """SA-V layout: the per-object annotation folders, by object id."""
        dirs = [p for p in self.annotation_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        return sorted(dirs, key=lambda p: int(p.name))

    def prompts(self) -> list[Prompt]:
        """The semi-supervised input masks, by frame then object id."""
        if self.layout == "davis":
            return davis_first_frame_prompts(self)
        return sav_first_appearance_prompts(self)


def read_davis_objects(path: str | Path) -> dict[int, np.ndarray]:
    """A DAVIS palette PNG -> {object id: [H, W] bool} for every id present except 0 and void (255)."""
    labels = read_palette_png(path)
    ids = [int(i) for i in np.unique(labels) if i not in (0, DAVIS_VOID)]
    return {i: labels == i for i in ids}


def davis_first_frame_prompts(video: VosVideo) -> list[Prompt]:
    first = video.annotation_dir / f"{video.frame_names[0]}.png"
    if not first.is_file():
        raise DatasetError(f"{video.name}: no annotation for the first frame ({first})")
    return [Prompt(0, obj, mask) for obj, mask in read_davis_objects(first).items()]


def sav_first_appearance_prompts(video: VosVideo) -> list[Prompt]:
    """Each object's first non-empty annotated mask; objects never visible are left out."""
    index = {name: i for i, name in enumerate(video.frame_names)}
    prompts = []
    for obj_dir in video.object_dirs():
        pngs = sorted(obj_dir.glob("*.png"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
        for png in pngs:
            mask = read_palette_png(png) > 0
            if mask.any():
                if png.stem not in index:
                    raise DatasetError(
                        f"{video.name}: annotation {png} has no frame {png.stem} among the JPEGs"
                    )
                prompts.append(Prompt(index[png.stem], int(obj_dir.name), mask))
                break
    prompts.sort(key=lambda p: (p.frame_idx, p.obj_id))
    return prompts


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _folders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def dataset_dirs(dataset: str, root: str | Path, resolution: str = "480p") -> tuple[Path, Path]:
    """(frames folder, annotations folder) of a dataset root; DatasetError when either is missing."""
    root = Path(root)
    if dataset == "davis":
        frames, annotations = root / "JPEGImages" / resolution, root / "Annotations" / resolution
    elif dataset == "sav":
        frames, annotations = root / "JPEGImages_24fps", root / "Annotations_6fps"
    else:
        raise DatasetError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASETS)})")
    for folder in (frames, annotations):
        if not folder.is_dir():
            raise DatasetError(f"{dataset} root {root}: folder {folder} not found")
    return frames, annotations


def list_sequences(dataset: str, root: str | Path, split: str = "val", resolution: str = "480p") -> list[str]:
    """Sequence names of a split: from the split file when the root has one, else every annotation folder."""
    root = Path(root)
    _, annotations = dataset_dirs(dataset, root, resolution)
    split_file = (
        root / "ImageSets" / "2017" / f"{split}.txt" if dataset == "davis" else root / f"sav_{split}.txt"
    )
    return _read_list(split_file) if split_file.is_file() else _folders(annotations)


def open_dataset(
    dataset: str,
    root: str | Path,
    *,
    split: str = "val",
    sequences: Sequence[str] | None = None,
    resolution: str = "480p",
) -> list[VosVideo]:
    """The videos of a DAVIS 2017 or SA-V val/test root, in split order (or the given `sequences`)."""
    frames, annotations = dataset_dirs(dataset, root, resolution)
    names = list(sequences) if sequences else list_sequences(dataset, root, split, resolution)
    if not names:
        raise DatasetError(f"{dataset} root {root}: no sequences")
    videos = []
    for name in names:
        ann = annotations / name
        if not ann.is_dir():
            raise DatasetError(f"{name}: annotation folder {ann} not found")
        videos.append(VosVideo(name, dataset, tuple(list_frames(frames / name)), ann))
    return videos
