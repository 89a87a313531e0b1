"""The dataset formats by name: every `DatasetSource` (`source.py`) the pipeline and `es3 eval` know,
and the evaluation videos of a val/test root of one of them.

Sources index in this order: SA-V, last, takes the embedding store's videos no other source claimed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from es3_jax.data.davis import DavisSource
from es3_jax.data.frames import list_frames
from es3_jax.data.sa1b import Sa1bSource
from es3_jax.data.sav import SavSource
from es3_jax.data.source import DatasetSource
from es3_jax.data.videos import DatasetError, VosVideo

SOURCES: dict[str, type[DatasetSource]] = {"sa1b": Sa1bSource, "davis": DavisSource, "sav": SavSource}


def source_named(name: str) -> type[DatasetSource]:
    """The format registered as `name`; DatasetError naming the known ones otherwise."""
    if name not in SOURCES:
        raise DatasetError(f"unknown dataset {name!r} (expected one of {', '.join(sorted(SOURCES))})")
    return SOURCES[name]


def dataset_dirs(dataset: str, root: str | Path, resolution: str = "480p") -> tuple[Path, Path]:
    """(frames folder, annotations folder) of a val/test root; DatasetError when either is missing.
    `resolution` names the DAVIS folders (SA-V has one)."""
    return source_named(dataset).dataset_dirs(root, resolution)


def list_sequences(dataset: str, root: str | Path, split: str = "val", resolution: str = "480p") -> list[str]:
    """Sequence names of a split: from the split file when the root has one, else every annotation folder."""
    return source_named(dataset).list_sequences(root, split, resolution)


def open_dataset(
    dataset: str,
    root: str | Path,
    *,
    split: str = "val",
    sequences: Sequence[str] | None = None,
    resolution: str = "480p",
) -> list[VosVideo]:
    """The videos of a val/test root, in split order (or the given `sequences`); DatasetError names a
    missing annotation folder or the JPEG of an annotated frame."""
    source = source_named(dataset)
    frames, annotations = source.dataset_dirs(root, resolution)
    names = list(sequences) if sequences else source.list_sequences(root, split, resolution)
    if not names:
        raise DatasetError(f"{dataset} root {root}: no sequences")
    videos = []
    for name in names:
        ann = annotations / name
        if not ann.is_dir():
            raise DatasetError(f"{name}: annotation folder {ann} not found")
        video = source.open_video(name, tuple(list_frames(frames / name)), ann)
        video.check_frames()
        videos.append(video)
    return videos
