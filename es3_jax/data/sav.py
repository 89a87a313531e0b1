"""SA-V on disk: training annotations (`<video>_manual.json`, `<video>_auto.json`) and their index, and
the val/test layout with the semi-supervised prompts of an evaluation video.

SA-V videos are 24 fps; masks are annotated on every 4th frame. Annotated index i is the 24-fps frame
4·i, and the extracted JPEGs are named by the 24-fps index (`<frames_root>/<video>/00004.jpg`). The
`masklet` field is nested `[annotated frame][object]` of COCO compressed RLEs (`size` = [H, W],
column-major); an object that is not visible on a frame is an empty RLE (the SAM 2 loader also
tolerates `None`, and so does this one). `masklet_first_appeared_frame` is in annotated-frame units
and is a float in manual files, an int in auto files.

The index (`scan_sav`) turns a training folder into compact `VideoEntry` records, the only thing the
clip sampler and the pipeline need per video: the frame stems that carry an annotation, their 24-fps
numbers and an [annotated frame, object] visibility table. Videos whose annotation does not fit their
frames are reported as `Problem`s and left out, so a bad video never stops a long run.

Val/test layout::

    <root>/JPEGImages_24fps/<video>/00000.jpg ...           every 24-fps frame
    <root>/Annotations_6fps/<video>/<obj:03d>/00000.png ...  one binary PNG per object per annotated frame
    <root>/sav_<split>.txt                                  video names (else: every annotation folder)

An object's id is its folder number. The semi-supervised prompt of a video is each object's mask on the
first annotated frame where it is non-empty, so an object may join after frame 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from es3_jax.data.frames import FrameError
from es3_jax.data.masks import read_palette_png
from es3_jax.data.videos import (
    DatasetError,
    Problem,
    Prompt,
    VideoEntry,
    VosVideo,
    numbered_frame_stems,
    require_dirs,
    split_sequences,
)
from es3_jax.errors import Es3Error
from es3_jax.progress import progress_bar

ANN_EVERY = 4  # SA-V annotates every 4th 24-fps frame
ANNOTATION_KINDS = ("manual", "auto", "both")


class SavError(Es3Error):
    """An SA-V annotation file that cannot be used; the message names the file and the field."""


def decode_rle(rle: Mapping[str, Any] | None, size: tuple[int, int] | None = None) -> np.ndarray:
    """One COCO RLE -> mask [H, W] uint8 (0/1). `None` (tolerated like SAM 2) needs `size` = (H, W)."""
    if rle is None:
        if size is None:
            raise SavError("a None mask needs the frame size to decode")
        return np.zeros(size, np.uint8)
    return np.ascontiguousarray(mask_utils.decode(dict(rle)))


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Mask [H, W] (bool or 0/1) -> COCO compressed RLE `{"size": [H, W], "counts": str}`, as SA-V
    stores it."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_area(rle: Mapping[str, Any] | None) -> int:
    """Foreground pixel count of one RLE, without decoding it (0 for `None`)."""
    # pycocotools' list form overflows past 255 items with numpy 2; one call per RLE is still microseconds.
    return 0 if rle is None else int(mask_utils.area(dict(rle)))


@dataclasses.dataclass(frozen=True)
class SavAnnotation:
    """The masklets of one video (one annotation file, or manual and auto files merged).

    `masklet[i][k]` is the RLE of object k on annotated frame i (24-fps frame `ANN_EVERY * i`).
    Per-object tuples are indexed by k; `source_ids` is `masklet_id` in the file the object came from.
    """

    video_id: str
    num_frames: int  # 24-fps frames in the video
    height: int
    width: int
    masklet: list[list[dict[str, Any] | None]]
    source_ids: tuple[int, ...]
    masklet_types: tuple[str, ...]
    first_appeared: tuple[int, ...]  # annotated-frame units
    stability: np.ndarray | None = (
        None  # [annotated frame, object] float32, auto masklets only (NaN elsewhere)
    )

    @property
    def num_annotated(self) -> int:
        return len(self.masklet)

    @property
    def num_objects(self) -> int:
        return len(self.source_ids)

    @property
    def frame_numbers(self) -> np.ndarray:
        """24-fps frame number of each annotated frame [A] int."""
        return np.arange(self.num_annotated, dtype=np.int64) * ANN_EVERY

    def areas(self) -> np.ndarray:
        """Mask area of every object on every annotated frame [A, N] int64."""
        return np.array([[rle_area(r) for r in frame] for frame in self.masklet], dtype=np.int64).reshape(
            self.num_annotated, self.num_objects
        )

    def masks(self, ann_index: int, objects: Sequence[int] | None = None) -> np.ndarray:
        """Masks of `objects` (default all) on annotated frame `ann_index` [O, H, W] uint8."""
        frame = self.masklet[ann_index]
        objects = range(self.num_objects) if objects is None else objects
        out = np.zeros((len(objects), self.height, self.width), np.uint8)
        for o, k in enumerate(objects):
            if frame[k] is not None:
                out[o] = decode_rle(frame[k])
        return out


def _field(data: Mapping[str, Any], key: str, path: Path) -> Any:
    if key not in data:
        raise SavError(f"{path}: missing field {key!r}")
    return data[key]


def read_sav_json(path: str | Path) -> SavAnnotation:
    """Parse one `<video>_manual.json` or `<video>_auto.json`; SavError names the file and field at fault."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SavError(f"{path}: cannot read the annotation JSON: {e}") from e
    if not isinstance(data, dict):
        raise SavError(f"{path}: expected a JSON object at the top level")
    masklet = _field(data, "masklet", path)
    if not isinstance(masklet, list):
        raise SavError(f"{path}: 'masklet' must be a list of annotated frames")
    try:
        height = int(float(_field(data, "video_height", path)))
        width = int(float(_field(data, "video_width", path)))
        num_frames = int(float(data.get("video_frame_count", ANN_EVERY * max(len(masklet) - 1, 0) + 1)))
    except (TypeError, ValueError) as e:
        raise SavError(f"{path}: video_height/video_width/video_frame_count are not numbers: {e}") from e
    ids = data.get("masklet_id")
    n = int(data.get("masklet_num", len(ids) if ids is not None else (len(masklet[0]) if masklet else 0)))
    ids = list(range(n)) if ids is None else [int(i) for i in ids]
    for i, frame in enumerate(masklet):
        if not isinstance(frame, list) or len(frame) != n:
            got = len(frame) if isinstance(frame, list) else type(frame).__name__
            raise SavError(f"{path}: masklet[{i}] has {got} objects, expected masklet_num = {n}")
    first = data.get("masklet_first_appeared_frame") or [0] * n
    types = data.get("masklet_type") or ["manual"] * n
    stability = None
    scores = data.get("masklet_stability_score")
    if scores and isinstance(scores[0], list):  # auto files: [frame][object]
        stability = np.array([[np.nan if s is None else s for s in f] for f in scores], np.float32)
    return SavAnnotation(
        video_id=str(data.get("video_id", path.name.rsplit("_", 1)[0])),
        num_frames=num_frames,
        height=height,
        width=width,
        masklet=masklet,
        source_ids=tuple(ids),
        masklet_types=tuple(str(t) for t in types),
        first_appeared=tuple(int(float(f)) for f in first),
        stability=stability,
    )


def merge_annotations(parts: Sequence[SavAnnotation]) -> SavAnnotation:
    """Objects of several files of one video (manual then auto) as one annotation."""
    if len(parts) == 1:
        return parts[0]
    head = parts[0]
    for p in parts[1:]:
        if (p.height, p.width, p.num_annotated) != (head.height, head.width, head.num_annotated):
            raise SavError(
                f"{head.video_id}: manual and auto files disagree on the frame size or the number of "
                f"annotated frames ({head.height}x{head.width}x{head.num_annotated} vs "
                f"{p.height}x{p.width}x{p.num_annotated})"
            )
    stab = [
        p.stability
        if p.stability is not None
        else np.full((p.num_annotated, p.num_objects), np.nan, np.float32)
        for p in parts
    ]
    return dataclasses.replace(
        head,
        masklet=[[r for p in parts for r in p.masklet[i]] for i in range(head.num_annotated)],
        source_ids=sum((p.source_ids for p in parts), ()),
        masklet_types=sum((p.masklet_types for p in parts), ()),
        first_appeared=sum((p.first_appeared for p in parts), ()),
        stability=np.concatenate(stab, axis=1),
    )


def annotation_files(annotation_dir: str | Path, skip_dirs: Iterable[str] = ()) -> dict[str, dict[str, Path]]:
    """`{video: {"manual": path, "auto": path}}` for the `*_manual.json` / `*_auto.json` files in
    `annotation_dir` and in its direct subfolders (SA-V ships them in `sav_train/sav_000/`, ...).

    Subfolders named in `skip_dirs` (frame folders, when annotations sit beside them) are not listed.
    """
    root = Path(annotation_dir)
    if not root.is_dir():
        raise SavError(f"annotation folder not found: {root}")
    skip = set(skip_dirs)
    found: dict[str, dict[str, Path]] = {}

    def add(entry: os.DirEntry) -> None:
        for kind in ("manual", "auto"):
            suffix = f"_{kind}.json"
            if entry.name.endswith(suffix):
                found.setdefault(entry.name[: -len(suffix)], {})[kind] = Path(entry.path)

    with os.scandir(root) as it:
        subdirs = []
        for entry in it:
            if entry.is_file():
                add(entry)
            elif entry.is_dir() and entry.name not in skip:
                subdirs.append(entry.path)
    for sub in sorted(subdirs):
        with os.scandir(sub) as it:
            for entry in it:
                if entry.is_file():
                    add(entry)
    return found


def _jpeg_size(frames_dir: Path, stem: str) -> tuple[int, int] | None:
    """(H, W) of one frame, from its header only."""
    for ext in (".jpg", ".jpeg", ".JPG", ".JPEG"):
        p = frames_dir / f"{stem}{ext}"
        if p.exists():
            with Image.open(p) as im:
                return im.height, im.width
    return None


def index_sav_video(
    name: str,
    files: Sequence[Path],
    stems: Sequence[str],
    *,
    frame_size: tuple[int, int] | None = None,
) -> tuple[VideoEntry | None, list[Problem]]:
    """Check one video's annotation against its frames and build its entry.

    `stems` are the frame names the frame source has for this video (JPEG stems or the embedding
    store's frame names), `frame_size` the (H, W) of its frames when known. Problems are returned,
    never raised: unreadable or inconsistent JSON, RLE sizes that differ from the frames, annotated
    frames without a frame, and objects that are never visible (dropped; the video is kept).
    """
    try:
        ann = merge_annotations([read_sav_json(f) for f in files])
    except SavError as e:
        return None, [Problem(name, str(e))]
    if ann.num_annotated == 0 or ann.num_objects == 0:
        return None, [Problem(name, "no annotated frames or no objects")]
    sizes = {tuple(r["size"]) for frame in ann.masklet for r in frame if r is not None}
    expected = {(ann.height, ann.width)}
    if sizes - expected:
        return None, [
            Problem(name, f"RLE sizes {sorted(sizes)} differ from video_height x video_width {expected}")
        ]
    if frame_size is not None and tuple(frame_size) != (ann.height, ann.width):
        return None, [
            Problem(
                name, f"frames are {frame_size[0]}x{frame_size[1]} but the masks are {ann.height}x{ann.width}"
            )
        ]
    by_number = {int(s): (i, s) for i, s in enumerate(stems) if s.isdigit()}
    numbers = ann.frame_numbers
    missing = [int(f) for f in numbers if int(f) not in by_number]
    if missing:
        shown = ", ".join(f"{m:05d}" for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
        return None, [Problem(name, f"{len(missing)} annotated frames have no frame: {shown}")]
    visible = ann.areas() > 0
    problems = []
    seen = visible.any(axis=0)
    if not seen.all():
        dropped = [ann.source_ids[k] for k in np.flatnonzero(~seen)]
        if not seen.any():
            return None, [Problem(name, "no object is visible on any annotated frame")]
        problems.append(Problem(name, f"objects {dropped} are never visible and were dropped", skipped=False))
    keep = tuple(int(k) for k in np.flatnonzero(seen))
    entry = VideoEntry(
        name=name,
        source="sav",
        annotation=tuple(str(f) for f in files),
        stems=tuple(by_number[int(f)][1] for f in numbers),
        frame_numbers=numbers,
        frame_positions=np.array([by_number[int(f)][0] for f in numbers], np.int64),
        visible=visible[:, list(keep)],
        objects=keep,
        height=ann.height,
        width=ann.width,
    )
    return entry, problems


def scan_sav(
    frames_root: str | Path | None,
    annotation_dir: str | Path | None = None,
    *,
    annotation: str = "manual",
    videos: Sequence[str] | None = None,
    frame_stems: Callable[[str], Sequence[str] | None] | None = None,
    check_frame_size: bool = True,
    progress: bool = False,
) -> tuple[list[VideoEntry], list[Problem]]:
    """Index an SA-V training set: entries of the usable videos (sorted by name) and the problems found.

    Frames come from `frames_root/<video>/<24fps:05d>.jpg` unless `frame_stems(video)` is given (e.g.
    the embedding store's frame names; `None` from it means the video has no frames). `videos`
    restricts the index (default: every frame folder, or every annotated video when `frame_stems` is
    given). `annotation_dir` defaults to `frames_root`. `annotation` is "manual" (what SAM 2 trains
    on), "auto" or "both" (manual objects first).
    """
    if annotation not in ANNOTATION_KINDS:
        raise SavError(f"DATA.ANNOTATION must be one of {ANNOTATION_KINDS}, got {annotation!r}")
    frames_root = Path(frames_root) if frames_root else None
    if frame_stems is None and (frames_root is None or not frames_root.is_dir()):
        raise SavError(f"SA-V frames folder not found: {frames_root}")
    ann_root = Path(annotation_dir) if annotation_dir else frames_root
    if ann_root is None:
        raise SavError("no annotation folder: set DATA.ANNOTATION_DIR")
    frame_dirs: set[str] = set()
    if frames_root is not None and frames_root.is_dir():
        frame_dirs = {e.name for e in os.scandir(frames_root) if e.is_dir()}
    files = annotation_files(ann_root, skip_dirs=frame_dirs if ann_root == frames_root else ())
    if videos is None:
        videos = sorted(frame_dirs) if frame_stems is None else sorted(files)
    kinds = ("manual", "auto") if annotation == "both" else (annotation,)
    entries: list[VideoEntry] = []
    problems: list[Problem] = []
    with progress_bar(len(videos), "indexing SA-V", unit="video", enabled=progress) as bar:
        for name in sorted(videos):
            bar.update()
            paths = [files.get(name, {}).get(k) for k in kinds]
            if any(p is None for p in paths):
                wanted = " and ".join(
                    f"{name}_{k}.json" for k, p in zip(kinds, paths, strict=True) if p is None
                )
                problems.append(Problem(name, f"no {wanted} under {ann_root}"))
                continue
            frames_dir = frames_root / name if frames_root is not None else None
            try:
                stems = frame_stems(name) if frame_stems is not None else numbered_frame_stems(frames_dir)
            except FrameError as e:
                problems.append(Problem(name, str(e)))
                continue
            if not stems:
                problems.append(Problem(name, "no frames"))
                continue
            size = None
            if check_frame_size and frames_dir is not None and frames_dir.is_dir():
                size = _jpeg_size(frames_dir, stems[0])
            entry, found = index_sav_video(name, paths, stems, frame_size=size)
            problems.extend(found)
            if entry is not None:
                if frames_dir is not None:
                    entry = dataclasses.replace(entry, frames_dir=str(frames_dir))
                entries.append(entry)
    return entries, problems


def load_masks(entry: VideoEntry, positions: Sequence[int], objects: Sequence[int]) -> np.ndarray:
    """Ground-truth masks of kept objects `objects` (indices into `entry.objects`) on annotated frames
    `positions` [T, O, H, W] uint8, read from the entry's annotation file(s)."""
    ann = merge_annotations([read_sav_json(f) for f in entry.annotation])
    ids = [entry.objects[o] for o in objects]
    return np.stack([ann.masks(int(p), ids) for p in positions])


# --------------------------------------------------------------------------------------------------
# Val/test layout


def dataset_dirs(root: str | Path) -> tuple[Path, Path]:
    """(frames folder, annotations folder) of an SA-V val/test root; DatasetError when either is missing."""
    root = Path(root)
    frames, annotations = root / "JPEGImages_24fps", root / "Annotations_6fps"
    require_dirs("sav", root, frames, annotations)
    return frames, annotations


def list_sequences(root: str | Path, split: str = "val") -> list[str]:
    """Video names of a val/test split: from `sav_<split>.txt` when the root has it, else every annotation
    folder."""
    root = Path(root)
    _, annotations = dataset_dirs(root)
    return split_sequences(root / f"sav_{split}.txt", annotations)


class SavVideo(VosVideo):
    """An SA-V val/test video: one folder of binary PNGs per object, named by the object id."""

    layout = "sav"

    def object_dirs(self) -> list[Path]:
        """The per-object annotation folders, by object id."""
        dirs = [p for p in self.annotation_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        return sorted(dirs, key=lambda p: int(p.name))

    def prompts(self) -> list[Prompt]:
        """Each object's first non-empty annotated mask, by frame then object id; objects never visible
        are left out."""
        index = {name: i for i, name in enumerate(self.frame_names)}
        prompts = []
        for obj_dir in self.object_dirs():
            pngs = sorted(obj_dir.glob("*.png"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
            for png in pngs:
                mask = read_palette_png(png) > 0
                if mask.any():
                    if png.stem not in index:
                        raise DatasetError(
                            f"{self.name}: annotation {png} has no frame {png.stem} among the JPEGs"
                        )
                    prompts.append(Prompt(index[png.stem], int(obj_dir.name), mask))
                    break
        prompts.sort(key=lambda p: (p.frame_idx, p.obj_id))
        return prompts
