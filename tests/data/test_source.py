"""A new dataset format is one class and one registry line: a folder of PNG frames with a numpy file of
masks trains through the pipeline and opens as evaluation videos, touching no other module."""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from es3_jax import config as config_lib
from es3_jax.data import datasets, indexing, loading, pipeline
from es3_jax.data.frames import list_frames
from es3_jax.data.source import PipelineError
from es3_jax.data.video_source import VideoSource
from es3_jax.data.videos import DatasetError, Problem, Prompt, VideoEntry, VosVideo


class PngVideo(VosVideo):
    layout = "davis"

    def annotation_files(self) -> list[Path]:
        return []

    def prompts(self) -> list[Prompt]:
        first = np.load(self.annotation_dir / "masks.npy")[0]
        return [Prompt(0, k + 1, m) for k, m in enumerate(first) if m.any()]


@dataclass(frozen=True)
class PngSource(VideoSource):
    """`<root>/<video>/<t>.png` frames and `<root>/<video>/masks.npy` [T, O, H, W] bool."""

    name: ClassVar[str] = "pngs"
    default: ClassVar[bool] = False
    root_key: ClassVar[str] = "the test's root"
    ROOT: ClassVar[str] = ""

    root: str = ""

    @classmethod
    def from_config(cls, cfg) -> "PngSource":
        return cls(cls.ROOT)

    def configured(self, store) -> bool:
        return bool(self.root)

    def index(self, store, progress) -> tuple[list[VideoEntry], list[Problem]]:
        entries = []
        for folder in sorted(Path(self.root).iterdir()):
            masks = np.load(folder / "masks.npy")
            frames = list_frames(folder)
            entries.append(
                VideoEntry(
                    name=folder.name,
                    source=self.name,
                    annotation=(str(folder / "masks.npy"),),
                    stems=tuple(p.stem for p in frames),
                    frame_numbers=np.arange(len(frames)),
                    frame_positions=np.arange(len(frames)),
                    visible=masks.any(axis=(2, 3)),
                    objects=tuple(range(masks.shape[1])),
                    height=masks.shape[2],
                    width=masks.shape[3],
                    frames_dir=str(folder),
                )
            )
        return entries, []

    def load_masks(self, entry, positions, objects) -> np.ndarray:
        return np.load(entry.annotation[0])[np.asarray(positions)][:, list(objects)].astype(np.uint8)

    @classmethod
    def dataset_dirs(cls, root, resolution) -> tuple[Path, Path]:
        return Path(root), Path(root)

    @classmethod
    def list_sequences(cls, root, split, resolution) -> list[str]:
        return sorted(p.name for p in Path(root).iterdir())

    @classmethod
    def open_video(cls, name, frame_paths, annotation_dir) -> VosVideo:
        return PngVideo(name, tuple(frame_paths), annotation_dir)


def _make_pngs(root: Path, videos: int = 4, frames: int = 3, height: int = 12, width: int = 16) -> None:
    rng = np.random.default_rng(0)
    for v in range(videos):
        folder = root / f"clip{v}"
        folder.mkdir(parents=True)
        for t in range(frames):
            Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8)).save(folder / f"{t:05d}.png")
        masks = np.zeros((frames, 2, height, width), bool)
        masks[:, 0, 2:6, 3:9] = True
        masks[:, 1, 7:11, 8 + v : 12 + v] = True
        np.save(folder / "masks.npy", masks)


@pytest.fixture
def pngs(tmp_path, monkeypatch):
    _make_pngs(tmp_path / "pngs")
    monkeypatch.setitem(datasets.SOURCES, PngSource.name, PngSource)
    monkeypatch.setattr(PngSource, "ROOT", str(tmp_path / "pngs"))
    return tmp_path / "pngs"


def test_a_registered_format_trains_a_clip_batch(pngs):
    cfg = config_lib.load(
        overrides=[
            *("DATA.SOURCES", "[pngs]", "DATA.SOURCE_WEIGHTS", "[1]", "DATA.USE_PRECOMPUTED", "False"),
            *(
                "DATA.NUM_FRAMES",
                "2",
                "DATA.FRAME_SKIP",
                "1",
                "DATA.MAX_OBJECTS",
                "3",
                "DATA.MASK_SIZE",
                "12",
            ),
            *("DATA.VAL_VIDEOS", "1", "DATA.NUM_WORKERS", "0", "MODEL.TEACHER.IMAGE_SIZE", "16"),
        ]
    )
    pipe = pipeline.build_pipeline(cfg, batch_size=2, process_index=0, process_count=1, num_epochs=1)
    assert pipe.sources == ("pngs",) and len(pipe.videos) == 3 and not pipe.problems
    batch = next(iter(pipe))
    assert batch["images"].shape == (2, 2, 16, 16, 3) and batch["masks"].shape == (2, 2, 3, 12, 12)
    np.testing.assert_array_equal(batch["object_valid"], [[True, True, False]] * 2)
    for b in range(2):
        entry = pipe.loader.entries[batch["video_index"][b]]
        truth = np.load(entry.annotation[0])[batch["frame_indices"][b]]
        for t in range(2):
            expected = loading._resize_masks(truth[t].astype(np.uint8), 12)
            np.testing.assert_array_equal(batch["masks"][b, t, :2], expected)


def test_a_registered_format_opens_evaluation_videos(pngs):
    videos = datasets.open_dataset("pngs", pngs, sequences=["clip1", "clip2"])
    assert [v.name for v in videos] == ["clip1", "clip2"] and len(videos[0]) == 3
    assert [p.obj_id for p in videos[1].prompts()] == [1, 2]


def test_an_unknown_format_names_the_known_ones(pngs):
    with pytest.raises(
        DatasetError, match=r"unknown dataset 'ytvos' \(expected one of davis, pngs, sa1b, sav\)"
    ):
        datasets.source_named("ytvos")
    cfg = config_lib.load(overrides=["DATA.SOURCES", "[sav, ytvos]", "DATA.SOURCE_WEIGHTS", "[1, 1]"])
    with pytest.raises(
        PipelineError, match=r"DATA\.SOURCES.*\['ytvos'\].*\['davis', 'pngs', 'sa1b', 'sav'\]"
    ):
        indexing.index_dataset(cfg)
