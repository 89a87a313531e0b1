"""Where a video's trunk features come from: a folder of frames, a video file, an array of frames, an
array of trunk features, or a video of the embedding store. Each becomes a `FrameSource` that gives
one frame's trunk features `[1, g, g, Ct]` at a time, so a video is never held in memory whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from es3_jax.config import Config
from es3_jax.data.embedding_store import EmbeddingStore
from es3_jax.data.frames import FrameError, list_frames, load_frame_uint8, normalize, resize_frame
from es3_jax.data.video_file import VIDEO_EXTS, VideoFile, is_video_file
from es3_jax.errors import Es3Error

Video = str | Path | VideoFile | np.ndarray | tuple[EmbeddingStore, str]
# Normalised frames `[1, S, S, 3]` float32 -> trunk features `[1, g, g, Ct]`.
TrunkFn = Callable[[np.ndarray], jax.Array]
# `timed(name, fn, *args)`: fn(*args), its wall time added to the predictor's timings under `name`.
Timed = Callable[..., Any]


class FrameSourceError(Es3Error):
    """A video that cannot be read as given; the message says what was expected."""


def frame_size(paths: Sequence[Path]) -> tuple[int, int]:
    """The (height, width) every frame of a video has, read from the image headers (no decoding).

    Masks come out at one size, the video's (upstream takes it from the frames), and each frame is
    shown under its mask: a frame of another size is a FrameSourceError naming it and both sizes,
    raised before anything is tracked or written. FrameError for a frame that is not an image.
    """
    sizes = {}
    for path in paths:
        try:
            with Image.open(path) as image:
                sizes[path] = (image.height, image.width)
        except FileNotFoundError as e:
            raise FrameError(f"frame missing: {path}") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise FrameError(f"frame unreadable: {path}: {e}") from e
    first = sizes[paths[0]]
    other = [p for p in paths if sizes[p] != first]
    if other:
        listed = ", ".join(f"{p.name} is {sizes[p][1]}x{sizes[p][0]}" for p in other[:3])
        more = f" and {len(other) - 3} more" if len(other) > 3 else ""
        raise FrameSourceError(
            f"{paths[0].parent}: frames of different sizes: {paths[0].name} is {first[1]}x{first[0]} "
            f"(width x height), {listed}{more}; every frame of a video must have one size (resize them alike)"
        )
    return first


@dataclasses.dataclass(frozen=True)
class FrameFolder:
    """A folder's frames in playback order, and the (height, width) they all have."""

    paths: list[Path]
    size: tuple[int, int]


def open_frames(path: str | Path) -> VideoFile | FrameFolder:
    """A video file, opened (its frames indexed: a truncated file is refused), or a folder's frames,
    listed and their sizes checked (`frame_size`): what can be checked of a video before tracking."""
    if is_video_file(path):
        return VideoFile(path)
    if Path(path).is_file():
        raise FrameSourceError(
            f"{path}: neither a folder of frames nor a video file ({', '.join(VIDEO_EXTS)})"
        )
    paths = list_frames(path)
    return FrameFolder(paths, frame_size(paths))


@dataclasses.dataclass(frozen=True)
class FrameSource:
    """A video: its length, its output size (H, W), and `features(i)` -> `[1, g, g, Ct]` float32."""

    num_frames: int
    video_size: tuple[int, int]
    features: Callable[[int], jax.Array]


def open_video(
    video: Video,
    cfg: Config,
    trunk: TrunkFn,
    timed: Timed,
    video_size: tuple[int, int] | None = None,
) -> FrameSource:
    """The frame source of `video` (see `VideoPredictor.init_state` for the forms it takes).

    trunk: computes trunk features of a normalised frame (called only for frames, never for stored
    or given features). video_size: the output size; by default the frames' own, the store's
    recorded one, or the model's image size for bare features.
    """
    size, data = cfg.MODEL.TEACHER.IMAGE_SIZE, cfg.DATA

    def from_images(load: Callable[[int], np.ndarray], num_frames: int, hw: tuple[int, int]) -> FrameSource:
        """load(i): frame i as the model takes it, `[size, size, 3]` uint8."""

        def features(i: int) -> jax.Array:
            image = normalize(timed("decode", load, i), data.PIXEL_MEAN, data.PIXEL_STD)[None]
            return timed("trunk", trunk, image)

        return FrameSource(num_frames, hw, features)

    if isinstance(video, tuple):
        store, video_id = video
        meta = store.metadata(video_id)
        hw = meta.get("orig_size") or meta.get("video_size")
        default = tuple(int(v) for v in hw[:2]) if hw else (size, size)

        def stored(i: int) -> jax.Array:
            return timed("read", lambda: jnp.asarray(store.read(video_id, [i], dtype=np.float32)))

        source = FrameSource(int(meta["num_frames"]), video_size or default, stored)
    elif isinstance(video, str | Path | VideoFile):
        frames = open_frames(video) if isinstance(video, str | Path) else video
        if isinstance(frames, VideoFile):
            # Decoded frames resized as frames given as an array or streamed are: a file tracks as they do.
            source = from_images(
                lambda i: resize_frame(frames.frame(i), size),
                frames.num_frames,
                video_size or frames.video_size,
            )
        else:
            source = from_images(
                lambda i: load_frame_uint8(frames.paths[i], size)[0],
                len(frames.paths),
                video_size or frames.size,
            )
    else:
        video = np.asarray(video)
        if video.ndim != 4:
            raise FrameSourceError(
                f"video array must be [T, H, W, 3] frames or [T, g, g, C] features, got {video.shape}"
            )
        if video.dtype == np.uint8 and video.shape[-1] == 3:
            source = from_images(
                lambda i: resize_frame(video[i], size), video.shape[0], video_size or video.shape[1:3]
            )
        else:
            g, c = cfg.MODEL.TEACHER.grid, cfg.MODEL.TEACHER.TRUNK_DIM
            if video.shape[1:] != (g, g, c):
                raise FrameSourceError(
                    f"trunk features must be [T, {g}, {g}, {c}] for this model, got {video.shape}"
                )
            source = FrameSource(
                video.shape[0],
                video_size or (size, size),
                lambda i: jnp.asarray(video[i : i + 1], jnp.float32),
            )
    if source.num_frames < 1:
        raise FrameSourceError("the video has no frames")
    h, w = source.video_size
    return dataclasses.replace(source, video_size=(int(h), int(w)))
