"""An EfficientSAM3 seed embeddings folder (`save_video_embeddings_stage2.py` output), read.

Layout: `<src>/<video>/metadata.json` (`video_name`, `num_frames`, `feature_shape` [1024, 72, 72],
`image_size`, `backbone_stride`, `save_format` "pt" or "npy", `frames` (stems), `completed`) and one
`<stem>.pt` (or `.npy`) float32 `[C, h, w]` array per frame. `es3_jax.embed.import_seed_folder`
copies such a folder into the embedding store, channels-last and unchanged apart from the cast to
the store's dtype. The seed's v1 saver normalised with ImageNet statistics after a short-side
resize and centre crop (reference memory_compression.md §4.7), not SAM3's 0.5/0.5 full-frame
resize; the importer records the normalisation it is told.

`.pt` frames need torch: they are read by a function the caller gives (`porting.seed_embeddings`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from es3_jax.data.embedding_store import StoreError

SeedFrameReader = Callable[[Path], np.ndarray]  # a `.pt` frame file -> [C, h, w] float32


@dataclasses.dataclass(frozen=True)
class SeedVideo:
    name: str
    folder: Path
    stems: tuple[str, ...]
    suffix: str  # ".pt" or ".npy"
    meta: dict

    def frame_path(self, i: int) -> Path:
        return self.folder / f"{self.stems[i]}{self.suffix}"


def list_seed_videos(src: str | Path) -> list[SeedVideo]:
    """Every `<src>/<video>/metadata.json` folder, sorted by name; StoreError when there is none."""
    src = Path(src)
    if not src.is_dir():
        raise StoreError(f"seed embeddings folder not found: {src}")
    videos = []
    for folder in sorted(p for p in src.iterdir() if (p / "metadata.json").is_file()):
        try:
            meta = json.loads((folder / "metadata.json").read_text())
        except ValueError as e:
            raise StoreError(f"{folder / 'metadata.json'}: not valid JSON: {e}") from e
        stems = meta.get("frames")
        if not isinstance(stems, list):
            raise StoreError(f"{folder / 'metadata.json'}: no 'frames' list")
        fmt = str(meta.get("save_format", "pt")).lstrip(".")
        videos.append(
            SeedVideo(meta.get("video_name", folder.name), folder, tuple(map(str, stems)), f".{fmt}", meta)
        )
    if not videos:
        raise StoreError(f"no seed videos (<video>/metadata.json) under {src}")
    return videos


def load_seed_frame(path: Path, read_pt: SeedFrameReader) -> np.ndarray:
    """One seed frame `[C, h, w]` -> float32 `[h, w, C]`; StoreError naming a missing or unreadable file.

    `.npy` frames are read here; `.pt` frames by `read_pt` (PyTorch's format needs torch)."""
    try:
        array = np.load(path, allow_pickle=False) if path.suffix == ".npy" else read_pt(path)
    except FileNotFoundError as e:
        raise StoreError(f"seed frame missing: {path}") from e
    except StoreError:
        raise
    except Exception as e:  # numpy and torch raise a variety of types on a corrupt file
        raise StoreError(f"seed frame unreadable: {path}: {e}") from e
    if array.ndim != 3:
        raise StoreError(f"{path}: expected a [C, h, w] array, got shape {array.shape}")
    return np.ascontiguousarray(np.moveaxis(array.astype(np.float32, copy=False), 0, -1))
