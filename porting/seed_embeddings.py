"""Import an EfficientSAM3 seed embeddings folder (`save_video_embeddings_stage2.py` output) into the store.

Seed layout: `<src>/<video>/metadata.json` (`video_name`, `num_frames`, `feature_shape` [1024, 72, 72],
`image_size`, `backbone_stride`, `save_format` "pt" or "npy", `frames` (stems), `completed`) and one
`<stem>.pt` (or `.npy`) float32 `[C, h, w]` array per frame. Frames are stored channels-last,
unchanged apart from the cast to the store's dtype. `.pt` files are read with
`torch.load(weights_only=True)`.

Note: the seed's v1 saver normalised with ImageNet statistics after a short-side resize and centre
crop (reference memory_compression.md §4.7), not SAM3's 0.5/0.5 full-frame resize; the importer
records the normalisation it is told.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from es3_jax.data.embedding_store import EmbeddingStore, StoreError
from es3_jax.embed import EmbedResult


@dataclass(frozen=True)
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


def load_seed_frame(path: Path) -> np.ndarray:
    """One seed frame `[C, h, w]` -> float32 `[h, w, C]`; StoreError naming a missing or unreadable file."""
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            import torch

            array = torch.load(path, map_location="cpu", weights_only=True).float().numpy()
    except FileNotFoundError as e:
        raise StoreError(f"seed frame missing: {path}") from e
    except Exception as e:  # torch raises a variety of types on a corrupt file
        raise StoreError(f"seed frame unreadable: {path}: {e}") from e
    if array.ndim != 3:
        raise StoreError(f"{path}: expected a [C, h, w] array, got shape {array.shape}")
    return np.ascontiguousarray(np.moveaxis(array.astype(np.float32, copy=False), 0, -1))


def import_seed_folder(
    src: str | Path,
    store: EmbeddingStore,
    *,
    trunk: str,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    dtype: str = "bfloat16",
    shard_frames: int = 16,
    clevel: int = 3,
    on_error: str = "stop",
    process_index: int = 0,
    process_count: int = 1,
    extra_meta: Mapping[str, Any] | None = None,
) -> tuple[EmbedResult, list[str], dict]:
    """Copy this process's share of the seed videos (video i -> process i mod N) into `store`.

    -> (result, names of all seed videos, identity). Complete videos with the same frames are skipped.
    """
    from es3_jax.data.embedding_store import identity

    start = time.perf_counter()
    videos = list_seed_videos(src)
    image_sizes = {int(v.meta.get("image_size", 1008)) for v in videos}
    if len(image_sizes) != 1:
        raise StoreError(f"{src}: videos were embedded at different image sizes {sorted(image_sizes)}")
    ident = identity(trunk, pixel_mean, pixel_std, image_sizes.pop())
    store.check_writable(ident, dtype)
    result = EmbedResult()
    for i, video in enumerate(videos):
        if i % process_count != process_index:
            continue
        if store.complete_and_current(video.name, video.stems, ident):
            result.skipped.append(video.name)
            continue
        if video.meta.get("completed") is False or not video.stems:
            error = StoreError(f"{video.folder}: the seed marked this video incomplete")
            if on_error == "stop":
                raise error
            result.failed[video.name] = str(error)
            continue
        writer = None
        try:
            for f in range(len(video.stems)):
                frame = load_seed_frame(video.frame_path(f))
                if writer is None:
                    writer = store.begin_video(
                        video.name,
                        frame_names=video.stems,
                        feature_shape=frame.shape,
                        dtype=dtype,
                        ident=ident,
                        shard_frames=shard_frames,
                        clevel=clevel,
                        extra={
                            "source": str(video.folder),
                            "imported_from": "seed",
                            **dict(extra_meta or {}),
                        },
                    )
                if list(frame.shape) != writer.meta["shape"][1:]:
                    raise StoreError(
                        f"{video.frame_path(f)}: shape {list(frame.shape)} differs from the video's first "
                        f"frame {writer.meta['shape'][1:]} (channels-last)"
                    )
                writer.write(f, frame[None])
            writer.commit()
            writer = None
            result.written.append(video.name)
            result.frames += len(video.stems)
        except StoreError as e:
            if on_error == "stop":
                raise
            result.failed[video.name] = str(e)
        finally:
            if writer is not None:
                writer.abort()
    result.seconds = time.perf_counter() - start
    return result, [v.name for v in videos], ident
