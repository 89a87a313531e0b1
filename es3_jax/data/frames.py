"""Video frames from folders of images: listing, ordering, loading, resizing, normalising.

Layouts:
* SA-V extracted frames: `<data_dir>/<video>/<24fps index:05d>.jpg`;
* DAVIS: `<root>/JPEGImages/480p/<seq>/<index:05d>.jpg` (`<root>` or `<root>/JPEGImages/480p` given);
* a single video: a folder holding the images themselves.

Frames are ordered by the integer value of their stem (`2.jpg` before `10.jpg`), lexicographically
when some stem is not an integer, as upstream sam3 does. Preprocessing follows sam3's image-folder
loader: RGB, resized to `image_size` x `image_size` without keeping the aspect ratio (PIL bilinear,
as torchvision's resize of a PIL image), scaled to [0, 1], then `(x - mean) / std` per channel.
Upstream stores the normalised frames in float16; we normalise in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from es3_jax.errors import Es3Error

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tiff", ".webp")
DAVIS_FRAMES = Path("JPEGImages") / "480p"


class FrameError(Es3Error):
    """A frame folder or image that cannot be used; the message names the path."""


@dataclass(frozen=True)
class VideoFrames:
    """One video's frames in playback order."""

    name: str
    folder: Path
    paths: tuple[Path, ...]

    @property
    def stems(self) -> list[str]:
        return [p.stem for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def list_frames(folder: str | Path) -> list[Path]:
    """The image files of one video folder, sorted by integer stem; FrameError if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FrameError(f"frame folder not found: {folder}")
    paths = [p for p in folder.iterdir() if _is_image(p)]
    if not paths:
        raise FrameError(f"no images ({', '.join(IMAGE_EXTS)}) in {folder}")
    try:
        paths.sort(key=lambda p: (int(p.stem), p.name))
    except ValueError:
        paths.sort(key=lambda p: p.name)
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise FrameError(f"{folder}: several images share the frame name(s) {dup[:5]}")
    return paths


def video_root(data_dir: str | Path) -> Path:
    """The folder whose subfolders are videos: `data_dir`, or its DAVIS `JPEGImages/480p`."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FrameError(f"data folder not found: {data_dir}")
    if (data_dir / DAVIS_FRAMES).is_dir():
        return data_dir / DAVIS_FRAMES
    return data_dir


def list_videos(data_dir: str | Path) -> list[VideoFrames]:
    """Every video under `data_dir`, sorted by name.

    A folder that holds images directly is one video named after the folder; otherwise each
    subfolder holding images is a video (SA-V and DAVIS layouts). Subfolders without images are
    ignored; FrameError when there is no video at all.
    """
    root = video_root(data_dir)
    if any(_is_image(p) for p in root.iterdir()):
        return [VideoFrames(root.resolve().name, root, tuple(list_frames(root)))]
    videos = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any(_is_image(p) for p in sub.iterdir()):
            videos.append(VideoFrames(sub.name, sub, tuple(list_frames(sub))))
    if not videos:
        raise FrameError(f"no video folders with images under {root}")
    return videos


def read_frame(path: str | Path) -> np.ndarray:
    """One image file as RGB uint8 `[H, W, 3]` at its own size.

    FrameError naming the file when it is missing, unreadable or not an image.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as e:
        raise FrameError(f"frame missing: {path}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise FrameError(f"frame unreadable: {path}: {e}") from e


def load_frame_uint8(path: str | Path, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """One image as RGB uint8 `[image_size, image_size, 3]`, and its original `(height, width)`.

    FrameError naming the file when it is missing, unreadable or not an image.
    """
    image = read_frame(path)
    return resize_frame(image, image_size), image.shape[:2]


def resize_frame(image: np.ndarray, image_size: int) -> np.ndarray:
    """An RGB uint8 frame `[H, W, 3]` resized to the model's `[image_size, image_size, 3]` (bilinear,
    as frames read from files are)."""
    resized = Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def normalize(images, mean: Sequence[float], std: Sequence[float]):
    """RGB `[..., 3]` in [0, 255] (uint8, or float after colour augmentation) -> float32
    `(x / 255 - mean) / std`; numpy or jax arrays alike (numpy operands keep a jax array on its
    device, and this module free of jax for the ONNX driver)."""
    x = images.astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
