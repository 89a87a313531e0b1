"""The datasets by name: DAVIS 2017 (`davis.py`) and SA-V (`sav.py`) behind one set of calls, for the
evaluation commands (a val/test root -> `VosVideo`s) and the training pipeline (ground-truth masks of a
`VideoEntry`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from es3_jax.data import davis, sav
from es3_jax.data.frames import list_frames
from es3_jax.data.videos import DatasetError, VideoEntry, VosVideo

DATASETS = ("davis", "sav")


def _check(dataset: str) -> None:
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASETS)})")


def dataset_dirs(dataset: str, root: str | Path, resolution: str = "480p") -> tuple[Path, Path]:
    """(frames folder, annotations folder) of a dataset root; DatasetError when either is missing.
    `resolution` names the DAVIS folders (SA-V has one)."""
    _check(dataset)
    return davis.dataset_dirs(root, resolution) if dataset == "davis" else sav.dataset_dirs(root)


def list_sequences(dataset: str, root: str | Path, split: str = "val", resolution: str = "480p") -> list[str]:
    """Sequence names of a split: from the split file when the root has one, else every annotation folder."""
    _check(dataset)
    if dataset == "davis":
        return davis.list_sequences(root, split, resolution)
    return sav.list_sequences(root, split)


def open_dataset(
    dataset: str,
    root: str | Path,
    *,
    split: str = "val",
    sequences: Sequence[str] | None = None,
    resolution: str = "480p",
) -> list[VosVideo]:
    """The videos of a DAVIS 2017 or SA-V val/test root, in split order (or the given `sequences`);
    DatasetError names a missing annotation folder or the JPEG of an annotated frame."""
    frames, annotations = dataset_dirs(dataset, root, resolution)
    names = list(sequences) if sequences else list_sequences(dataset, root, split, resolution)
    if not names:
        raise DatasetError(f"{dataset} root {root}: no sequences")
    video_type = davis.DavisVideo if dataset == "davis" else sav.SavVideo
    videos = []
    for name in names:
        ann = annotations / name
        if not ann.is_dir():
            raise DatasetError(f"{name}: annotation folder {ann} not found")
        video = video_type(name, tuple(list_frames(frames / name)), ann)
        video.check_frames()
        videos.append(video)
    return videos


def load_masks(entry: VideoEntry, positions: Sequence[int], objects: Sequence[int]) -> np.ndarray:
    """Ground-truth masks of kept objects `objects` (indices into `entry.objects`) on annotated frames
    `positions` [T, O, H, W] uint8, read by the entry's dataset."""
    if entry.source == "davis":
        return davis.load_masks(entry, positions, objects)
    return sav.load_masks(entry, positions, objects)
