"""SA-1B on disk: images with their automatic masks, the index of a folder of them, and the filters
that choose which masks an image contributes.

Layout, as released (one folder per tar, or everything in one folder)::

    <root>/sa_000000/sa_1.jpg, sa_1.json, sa_2.jpg, sa_2.json, ...
    <root>/sa_000001/...                     (or <root>/sa_1.jpg, sa_1.json, ... directly)

`sa_<id>.json` holds::

    {"image": {"image_id": int, "width": int, "height": int, "file_name": "sa_<id>.jpg"},
     "annotations": [{"id": int, "segmentation": {"size": [H, W], "counts": str},
                      "area": int, "bbox": [x, y, w, h], "predicted_iou": float,
                      "point_coords": [[x, y]], "crop_box": [x, y, w, h], "stability_score": float}, ...]}

Each segmentation is a COCO compressed RLE of the whole image (column-major). Parts are annotated
alongside the wholes they belong to, so masks of one image may nest; the annotations are in no
particular order. The index (`scan_sa1b`) only pairs files by name: a 10% subset is over a million
images, so an image's JSON is read when the image is loaded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from es3_jax.data.clips import Clip, ClipSpec, image_clip
from es3_jax.data.frames import read_frame
from es3_jax.data.pseudo_video import MotionSpec, make_clip, sample_motion
from es3_jax.data.sav import SavError, count_pixels, decode_rle
from es3_jax.data.source import ClipArrays, EmptyClipError, PipelineError, StoreVideos
from es3_jax.data.videos import JPEG_EXTS, DatasetError, Problem, VosVideo

if TYPE_CHECKING:
    from es3_jax.config import Config

PREFIX = "sa_"
# The per-annotation fields the reader uses; the others (bbox, point_coords, crop_box) are not needed.
REQUIRED_FIELDS = ("segmentation", "area", "predicted_iou", "stability_score")
IMAGE_FIELDS = ("image_id", "width", "height", "file_name")


class Sa1bError(DatasetError):
    """An SA-1B image or annotation file that cannot be used; the message names the file (and the
    annotation index and field)."""


@dataclass(frozen=True)
class AnnotationFilter:
    """Which annotations of an image to keep. SAM 2's SA-1B loader always drops masks of area 0;
    these thresholds narrow the choice further (the defaults keep every other mask).

    Areas are fractions of the image (`area / (H * W)`), both bounds inclusive.
    """

    min_area: float = 0.0
    max_area: float = 1.0
    min_predicted_iou: float = 0.0
    min_stability_score: float = 0.0

    def __post_init__(self) -> None:
        values = (self.min_area, self.max_area, self.min_predicted_iou, self.min_stability_score)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise Sa1bError(f"{self}: every threshold must be a finite number")
        if self.min_area > self.max_area:
            raise Sa1bError(f"{self}: min_area is above max_area, so no mask would be kept")


@dataclass(frozen=True)
class Sa1bImage:
    """One image of the index (small and picklable): its name (`sa_<id>`), JPEG and JSON paths."""

    source: ClassVar[str] = "sa1b"
    name: str
    image_path: str
    json_path: str


@dataclass(frozen=True)
class Sa1bAnnotation:
    """The contents of one `sa_<id>.json`. `annotations` are the file's dicts in file order, each
    checked to have the fields `REQUIRED_FIELDS` (numbers where numbers are expected)."""

    path: str
    image_id: int
    file_name: str
    height: int
    width: int
    annotations: tuple[dict[str, Any], ...]

    def __len__(self) -> int:
        return len(self.annotations)

    def select(self, filt: AnnotationFilter = AnnotationFilter()) -> np.ndarray:
        """Indices [K] int64 of the annotations that pass `filt`, in file order; a mask of area 0 never
        passes."""
        if not self.annotations:
            return np.zeros(0, np.int64)
        area = np.array([a["area"] for a in self.annotations], np.float64)
        iou = np.array([a["predicted_iou"] for a in self.annotations], np.float64)
        stability = np.array([a["stability_score"] for a in self.annotations], np.float64)
        fraction = area / (self.height * self.width)
        keep = (
            (area > 0)
            & (fraction >= filt.min_area)
            & (fraction <= filt.max_area)
            & (iou >= filt.min_predicted_iou)
            & (stability >= filt.min_stability_score)
        )
        return np.flatnonzero(keep).astype(np.int64)

    def masks(self, indices: Sequence[int]) -> np.ndarray:
        """Masks [K, H, W] uint8 (0/1) of the annotations `indices`, in the order asked for.

        Each RLE is checked first to be a compressed RLE of exactly H x W pixels (pycocotools decodes a
        short counts string into memory it never wrote); Sa1bError names the file and the index.
        """
        h, w = self.height, self.width
        indices = [int(i) for i in indices]
        counts = []
        for i in indices:
            if not 0 <= i < len(self.annotations):
                raise Sa1bError(f"{self.path}: no annotation {i} (the file has {len(self.annotations)})")
            rle = self.annotations[i]["segmentation"]
            size = rle.get("size")
            if not isinstance(size, (list, tuple)) or list(size) != [h, w]:
                raise Sa1bError(
                    f"{self.path}: annotations[{i}].segmentation: RLE size {size} differs from the "
                    f"image's height x width {h}x{w}"
                )
            counts.append(rle["counts"])
        pixels, _ = count_pixels(counts)
        out = np.zeros((len(indices), h, w), np.uint8)
        for k, i in enumerate(indices):
            if pixels[k] != h * w:
                raise Sa1bError(
                    f"{self.path}: annotations[{i}].segmentation: RLE counts do not decode to a {h}x{w} mask"
                )
            try:
                out[k] = decode_rle(self.annotations[i]["segmentation"])
            except SavError as e:
                raise Sa1bError(f"{self.path}: annotations[{i}].segmentation: {e}") from e
        return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_annotation(ann: Any, i: int, path: Path) -> dict[str, Any]:
    if not isinstance(ann, dict):
        raise Sa1bError(f"{path}: annotations[{i}] is a {type(ann).__name__}, not an object")
    for key in REQUIRED_FIELDS:
        if key not in ann:
            raise Sa1bError(f"{path}: annotations[{i}] has no field {key!r}")
    for key in ("area", "predicted_iou", "stability_score"):
        if not _is_number(ann[key]):
            raise Sa1bError(f"{path}: annotations[{i}].{key} is {ann[key]!r}, not a number")
    rle = ann["segmentation"]
    if not isinstance(rle, Mapping) or "size" not in rle or not isinstance(rle.get("counts"), str):
        raise Sa1bError(
            f"{path}: annotations[{i}].segmentation is not a COCO compressed RLE (a size and a counts string)"
        )
    return ann


def read_sa1b_json(path: str | Path) -> Sa1bAnnotation:
    """Parse one `sa_<id>.json`; Sa1bError names the file and the field (and annotation index) at fault."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Sa1bError(f"{path}: cannot read the annotation JSON: {e}") from e
    if not isinstance(data, dict):
        raise Sa1bError(f"{path}: expected a JSON object at the top level")
    for key in ("image", "annotations"):
        if key not in data:
            raise Sa1bError(f"{path}: missing field {key!r}")
    image, annotations = data["image"], data["annotations"]
    if not isinstance(image, dict):
        raise Sa1bError(f"{path}: 'image' must be an object")
    for key in IMAGE_FIELDS:
        if key not in image:
            raise Sa1bError(f"{path}: missing field 'image.{key}'")
    for key in ("image_id", "width", "height"):
        if not isinstance(image[key], int) or isinstance(image[key], bool):
            raise Sa1bError(f"{path}: image.{key} is {image[key]!r}, not an integer")
    if image["width"] < 1 or image["height"] < 1:
        raise Sa1bError(f"{path}: image size {image['height']}x{image['width']} is empty")
    if not isinstance(annotations, list):
        raise Sa1bError(f"{path}: 'annotations' must be a list")
    return Sa1bAnnotation(
        path=str(path),
        image_id=image["image_id"],
        file_name=str(image["file_name"]),
        height=image["height"],
        width=image["width"],
        annotations=tuple(_check_annotation(a, i, path) for i, a in enumerate(annotations)),
    )


def _sa_files(folder: str) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """({name: jpg path}, {name: json path}, subfolders) of one folder; of a `.jpeg` and a `.jpg` of
    one name, the first by file name is listed."""
    jpgs: dict[str, str] = {}
    jsons: dict[str, str] = {}
    subdirs = []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            subdirs.append(entry.path)
            continue
        if not entry.name.startswith(PREFIX):
            continue
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() in JPEG_EXTS:
            jpgs.setdefault(stem, entry.path)
        elif ext == ".json":
            jsons[stem] = entry.path
    return jpgs, jsons, subdirs


def scan_sa1b(root: str | Path) -> tuple[list[Sa1bImage], list[Problem]]:
    """Index the `sa_*.jpg` (or `.jpeg`) images of `root` and of its direct subfolders, each paired with
    the `sa_*.json` beside it; entries sorted by name, and the problems found.

    An image without its JSON, or a JSON without its image, is a Problem naming the missing file; a name
    found in two folders is indexed once, from the first (root, then subfolders by name). The JSONs are
    not read here. DatasetError when `root` is not a folder or holds no `sa_*.jpg`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"SA-1B folder not found: {root}")
    jpgs, jsons, subdirs = _sa_files(str(root))
    folders = [(jpgs, jsons)]
    for sub in sorted(subdirs):
        sub_jpgs, sub_jsons, _ = _sa_files(sub)
        folders.append((sub_jpgs, sub_jsons))
    if not any(jpgs for jpgs, _ in folders):
        raise DatasetError(f"no {PREFIX}*.jpg images in {root} or its subfolders")
    entries: dict[str, Sa1bImage] = {}
    problems: list[Problem] = []
    for jpgs, jsons in folders:
        for name, image_path in jpgs.items():
            json_path = jsons.get(name)
            if json_path is None:
                missing = os.path.join(os.path.dirname(image_path), name + ".json")
                problems.append(Problem(name, f"no annotation {missing} beside {image_path}"))
            elif name in entries:
                problems.append(
                    Problem(
                        name, f"{image_path} left out: the name is indexed from {entries[name].image_path}"
                    )
                )
            else:
                entries[name] = Sa1bImage(name, image_path, json_path)
        for name, json_path in jsons.items():
            if name not in jpgs:
                missing = os.path.join(os.path.dirname(json_path), name + ".jpg")
                problems.append(Problem(name, f"no image {missing} beside {json_path}"))
    problems.sort(key=lambda p: p.video)
    return [entries[name] for name in sorted(entries)], problems


def load_image(entry: Sa1bImage, annotation: Sa1bAnnotation) -> np.ndarray:
    """The image of `entry` [H, W, 3] uint8 at its own size; Sa1bError naming the JPEG when its size is
    not the JSON's (the masks would not fit it), FrameError when it cannot be read."""
    image = read_frame(entry.image_path)
    if image.shape[:2] != (annotation.height, annotation.width):
        raise Sa1bError(
            f"{entry.image_path}: the image is {image.shape[0]}x{image.shape[1]} but its annotation "
            f"{annotation.path} says {annotation.height}x{annotation.width}"
        )
    return image


@dataclass(frozen=True)
class Sa1bSource:
    """SA-1B as a `DatasetSource`: the images of DATA.SA1B.ROOT, each a pseudo-video (`pseudo_video.py`)
    of up to DATA.MAX_OBJECTS masks that pass `filter`, moving by a random `motion`. Training only."""

    name: ClassVar[str] = "sa1b"
    default: ClassVar[bool] = False
    root_key: ClassVar[str] = "DATA.SA1B.ROOT"

    root: str = ""
    filter: AnnotationFilter = field(default_factory=AnnotationFilter)
    motion: MotionSpec = field(default_factory=MotionSpec)

    @classmethod
    def from_config(cls, cfg: Config) -> Sa1bSource:
        sa1b = cfg.DATA.SA1B
        return cls(
            root=sa1b.ROOT,
            filter=AnnotationFilter(
                min_area=sa1b.MIN_AREA,
                max_area=sa1b.MAX_AREA,
                min_predicted_iou=sa1b.MIN_PREDICTED_IOU,
                min_stability_score=sa1b.MIN_STABILITY_SCORE,
            ),
            motion=MotionSpec.from_config(sa1b),
        )

    def configured(self, store: StoreVideos | None) -> bool:
        return bool(self.root)

    def index(self, store: StoreVideos | None, progress: bool) -> tuple[list[Sa1bImage], list[Problem]]:
        if store is not None:
            raise PipelineError(
                f"DATA.SOURCES lists {self.name}, whose pseudo-videos are frames warped as they load: they "
                "have no stored trunk features; train on frames (DATA.USE_PRECOMPUTED False)"
            )
        if not self.root:
            raise PipelineError(f"DATA.SOURCES lists {self.name} but {self.root_key} is empty")
        return scan_sa1b(self.root)

    def usable(self, entry: Sa1bImage, spec: ClipSpec) -> bool:
        return True

    def clip(self, entry: Sa1bImage, spec: ClipSpec, video: int, rng: np.random.Generator | None) -> Clip:
        return image_clip(spec, video)

    def load(
        self, entry: Sa1bImage, clip: Clip, spec: ClipSpec, rng: np.random.Generator, read_frames: bool
    ) -> ClipArrays:
        """The image as a pseudo-video: frames `[T, H, W, 3]`, masks `[T, O', H, W]` of O' annotations
        drawn with `rng` among those `filter` keeps (their indices are the object ids), and its motion."""
        annotation = read_sa1b_json(entry.json_path)
        kept = annotation.select(self.filter)
        if not len(kept):
            raise EmptyClipError(f"{entry.json_path}: no mask passes the DATA.SA1B filters ({self.filter})")
        objects = np.sort(rng.choice(kept, size=min(len(kept), spec.max_objects), replace=False))
        image = load_image(entry, annotation)
        motion = sample_motion(self.motion, rng, spec.num_frames, *image.shape[:2])
        frames, masks = make_clip(image, annotation.masks(objects), motion)
        positions = np.arange(spec.num_frames)
        return ClipArrays(
            frames=frames, masks=masks, object_ids=objects, frame_positions=positions, frame_numbers=positions
        )

    @classmethod
    def dataset_dirs(cls, root: str | Path, resolution: str) -> tuple[Path, Path]:
        raise _no_videos(root)

    @classmethod
    def list_sequences(cls, root: str | Path, split: str, resolution: str) -> list[str]:
        raise _no_videos(root)

    @classmethod
    def open_video(cls, name: str, frame_paths: Sequence[Path], annotation_dir: Path) -> VosVideo:
        raise _no_videos(name)


def _no_videos(where: str | Path) -> DatasetError:
    return DatasetError(f"{Sa1bSource.name} holds images, not videos: it has no evaluation videos ({where})")
