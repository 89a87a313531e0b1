"""What a dataset format provides for training and evaluation: the `DatasetSource` protocol.

A format (SA-V `sav.py`, DAVIS `davis.py`, SA-1B `sa1b.py`) is one class registered by name in
`datasets.SOURCES`. For training it indexes its root into entries, turns an entry into a clip and
loads that clip's frames and masks; for evaluation it opens the videos of a val/test root. The
pipeline (`indexing.py`, `loading.py`) and `es3 eval` only ever call these methods, so a new format is
one module and one registry line.

Every entry names its format in `source` (the registry key): one pool of training items may mix
formats (DATA.SOURCES empty mixes SA-V and DAVIS videos), and the loader finds each item's format by it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from es3_jax.data.clips import Clip, ClipSpec
from es3_jax.data.videos import Problem, VosVideo
from es3_jax.errors import Es3Error

if TYPE_CHECKING:
    from es3_jax.config import Config


class PipelineError(Es3Error):
    """The data pipeline cannot be built from this config or data; the message names the key or path."""


class EmptyClipError(PipelineError):
    """An entry that gives no clip under the config (e.g. no mask passes the filters); the loader gives
    its slot to the next entry of its source."""


class Entry(Protocol):
    """One training item of an index (small and picklable: it travels to the loader's workers)."""

    name: str
    source: str  # the registry key of its format


class StoreVideos:
    """The videos of an embedding store that no source has indexed yet, and their frame names.

    With DATA.USE_PRECOMPUTED the frames of a video are the store's: a source indexes the store's videos
    (`stems(name)`, None for a video the store lacks) and claims those it took, so that a source which
    takes whatever is left (SA-V, indexed last) leaves the others' videos alone.
    """

    def __init__(self, names: Iterable[str], frame_names: Callable[[str], Sequence[str]]) -> None:
        self._unclaimed = set(names)
        self._frame_names = frame_names

    @property
    def unclaimed(self) -> list[str]:
        return sorted(self._unclaimed)

    def stems(self, name: str) -> list[str] | None:
        return list(self._frame_names(name)) if name in self._unclaimed else None

    def claim(self, names: Iterable[str]) -> None:
        self._unclaimed -= set(names)


@dataclass(frozen=True)
class ClipArrays:
    """A clip as its format reads it, before resizing and augmentation.

    `frames`: T frames `[H, W, 3]` uint8 at their own size, None when the embedding store gives the
    clip's features; `masks` [T, O', H, W] uint8 of its O' objects (None when O' = 0); `object_ids`
    [O'] the objects' ids in the annotation; `frame_positions` [T] the frames' positions in the store
    (or the video's frames); `frame_numbers` [T] their frame numbers.
    """

    frames: Sequence[np.ndarray] | None
    masks: np.ndarray | None
    object_ids: np.ndarray
    frame_positions: np.ndarray
    frame_numbers: np.ndarray


class DatasetSource(Protocol):
    """A dataset format. Instances are made by `from_config` for training and must be picklable."""

    name: ClassVar[str]  # the registry key, the name DATA.SOURCES uses, and the `source` of its entries
    default: ClassVar[bool]  # trained on when DATA.SOURCES is empty (one pool with the other defaults)
    root_key: ClassVar[str]  # the config key of its training root, for messages

    @classmethod
    def from_config(cls, cfg: Config) -> DatasetSource:
        """The training source of this config (no I/O: it may be unconfigured)."""
        ...

    def configured(self, store: StoreVideos | None) -> bool:
        """Whether the config gives it something to index (its root, or the store's videos)."""
        ...

    def index(self, store: StoreVideos | None, progress: bool) -> tuple[list[Any], list[Problem]]:
        """Entries of the usable training items (each with `name` and `source`) and the problems found;
        PipelineError when the config cannot train on this format."""
        ...

    def usable(self, entry: Any, spec: ClipSpec) -> bool:
        """Whether some clip of `entry` qualifies under `spec`."""
        ...

    def clip(self, entry: Any, spec: ClipSpec, video: int, rng: np.random.Generator | None) -> Clip:
        """The clip of `entry` (item `video` of the loader): drawn with `rng` for training, the fixed
        validation clip when `rng` is None."""
        ...

    def load(
        self, entry: Any, clip: Clip, spec: ClipSpec, rng: np.random.Generator, read_frames: bool
    ) -> ClipArrays:
        """The arrays of `clip` (frames only when `read_frames`); `rng` draws whatever the format
        chooses as it loads. EmptyClipError when the entry gives no clip under the config."""
        ...

    @classmethod
    def dataset_dirs(cls, root: str | Path, resolution: str) -> tuple[Path, Path]:
        """(frames folder, annotations folder) of a val/test root; DatasetError when either is missing
        or the format has no evaluation videos."""
        ...

    @classmethod
    def list_sequences(cls, root: str | Path, split: str, resolution: str) -> list[str]:
        """Video names of a val/test split."""
        ...

    @classmethod
    def open_video(cls, name: str, frame_paths: Sequence[Path], annotation_dir: Path) -> VosVideo:
        """One evaluation video of a val/test root."""
        ...
