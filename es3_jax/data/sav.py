"""SA-V on disk: training annotations (`<video>_manual.json`, `<video>_auto.json`) and their index, and
the val/test layout with the semi-supervised prompts of an evaluation video.

SA-V videos are 24 fps; masks are annotated on every 4th frame. Annotated index i is the 24-fps frame
4·i, and the extracted JPEGs are named by the 24-fps index (`<frames_root>/<video>/00004.jpg`). The
`masklet` field is nested `[annotated frame][object]` of COCO compressed RLEs (`size` = [H, W],
column-major); an object that is not visible on a frame is an empty RLE. A frame that holds a `None`
mask is not annotated, as in SAM 2's loader: training leaves it out (`None` decodes as empty).
`masklet_first_appeared_frame` is in annotated-frame units and is a float in manual files, an int in
auto files.

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
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from es3_jax.data.frames import FrameError
from es3_jax.data.masks import read_palette_png
from es3_jax.data.source import PipelineError, StoreVideos
from es3_jax.data.video_source import VideoSource
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

if TYPE_CHECKING:
    from es3_jax.config import Config

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
    try:
        return np.ascontiguousarray(mask_utils.decode(dict(rle)))
    except (TypeError, ValueError) as e:  # pycocotools: "Invalid RLE mask representation", or not an RLE
        raise SavError(f"not a COCO RLE mask: {e}") from e


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Mask [H, W] (bool or 0/1) -> COCO compressed RLE `{"size": [H, W], "counts": str}`, as SA-V
    stores it."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_area(rle: Mapping[str, Any] | None) -> int:
    """Foreground pixel count of one RLE, without decoding it (0 for `None`)."""
    # pycocotools' list form overflows past 255 items with numpy 2; one call per RLE is still microseconds.
    return 0 if rle is None else int(mask_utils.area(dict(rle)))


MAX_RUN_DIGITS = 7  # 35 bits: more than any frame's pixel count


def count_pixels(counts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, foreground pixels) [n] int64 that each COCO compressed RLE counts string covers; -1 for
    a string that is not one. A valid RLE of an H x W mask covers H x W pixels.

    pycocotools reads any string without complaint (`mask_utils.area` returns a number for garbage, and
    `decode` fills what a short string leaves uncovered with whatever was in memory), so an index checks
    its RLEs here. The format (pycocotools' `rleToString`): each run length is a little-endian series of
    5-bit groups, one character per group ('0' + group, + 32 when another group follows), the last
    group's 0x10 bit its sign; from the fourth run of a string on, each run is stored as its difference
    to the run two before. All strings are parsed in one numpy pass.
    """
    n = len(counts)
    pixels = np.full(n, -1, np.int64)
    foreground = np.full(n, -1, np.int64)
    lengths = np.array([len(s) for s in counts], np.int64)
    bad = np.array([not s.isascii() for s in counts], bool) | (lengths == 0)
    text = "".join(counts).encode("ascii", "replace")  # a replaced character's string is bad already
    c = np.frombuffer(text, np.uint8) - np.uint8(48)  # characters below '0' wrap round to >= 208
    if not c.size:
        return pixels, foreground
    string_of_char = np.repeat(np.arange(n), lengths)
    bad[string_of_char[c > 63]] = True
    ends = c & 0x20 == 0  # the last character of a run length
    nonempty = np.flatnonzero(lengths)
    last_char = np.cumsum(lengths)[nonempty] - 1
    bad[nonempty[~ends[last_char]]] = True  # the string stops inside a run length
    ends[last_char] = True  # so that no run length goes on into the next string
    end = np.flatnonzero(ends)
    start = np.concatenate(([0], end[:-1] + 1))
    digits = end - start + 1
    value = (c[start] & 0x1F).astype(np.int64)
    longer = np.flatnonzero(digits > 1)
    for k in range(1, MAX_RUN_DIGITS):
        longer = longer[digits[longer] > k]
        value[longer] += (c[start[longer] + k] & 0x1F).astype(np.int64) << (5 * k)
    negative = np.flatnonzero(c[end] & 0x10)
    value[negative] -= np.int64(1) << (5 * np.minimum(digits[negative], MAX_RUN_DIGITS))
    # Run m of a string (m > 2) is the sum of the stored values of its parity from run 1 or 2 on.
    string = string_of_char[end]
    runs_per_string = np.bincount(string, minlength=n)
    first = np.repeat(np.cumsum(runs_per_string) - runs_per_string, runs_per_string)
    m = np.arange(len(value)) - first
    odd = m & 1
    same_parity = np.empty_like(value)  # running sums over every other value
    same_parity[0::2] = np.cumsum(value[0::2])
    same_parity[1::2] = np.cumsum(value[1::2])
    runs = same_parity - np.concatenate(([0], same_parity))[first + 1 - odd]
    leading = m == 0
    runs[leading] = value[leading]
    bad[string[(runs < 0) | (digits > MAX_RUN_DIGITS)]] = True
    has = np.flatnonzero(runs_per_string)
    first_run = np.cumsum(runs_per_string)[has] - runs_per_string[has]
    pixels[has] = np.add.reduceat(runs, first_run)
    foreground[has] = np.add.reduceat(runs * odd, first_run)
    pixels[bad] = foreground[bad] = -1
    return pixels, foreground


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
        """Mask area of every object on every annotated frame [A, N] int64, counted without decoding.
        SavError names the first mask that is not an RLE of the video's size (see `checked_areas`)."""
        cells = [(i, k) for i in range(self.num_annotated) for k in range(self.num_objects)]
        return self.checked_areas(cells).reshape(self.num_annotated, self.num_objects)

    def checked_areas(self, cells: Sequence[tuple[int, int]]) -> np.ndarray:
        """Areas [n] int64 of the masks `masklet[i][k]` of `cells` ((i, k) pairs; 0 for `None`), each
        checked to be a compressed RLE whose size and counts make a video_height x video_width mask;
        SavError names the first that is not."""
        h, w = self.height, self.width
        present, counts = [], []
        for n, (i, k) in enumerate(cells):
            rle = self.masklet[i][k]
            if rle is None:
                continue
            if not isinstance(rle, Mapping) or not isinstance(rle.get("counts"), str):
                raise SavError(
                    f"{self._where(i, k)} is not a COCO compressed RLE (a size and a counts string)"
                )
            size = rle.get("size")
            if not isinstance(size, (list, tuple)) or list(size) != [h, w]:
                raise SavError(
                    f"{self._where(i, k)}: RLE size {size} differs from video_height x video_width {h}x{w}"
                )
            present.append(n)
            counts.append(rle["counts"])
        pixels, foreground = count_pixels(counts)
        wrong = np.flatnonzero(pixels != h * w)
        if wrong.size:
            i, k = cells[present[wrong[0]]]
            raise SavError(f"{self._where(i, k)}: RLE counts do not decode to a {h}x{w} mask")
        areas = np.zeros(len(cells), np.int64)
        areas[present] = foreground
        return areas

    def _where(self, i: int, k: int) -> str:
        return f"masklet[{i}][{k}] (frame {ANN_EVERY * i:05d}, object {self.source_ids[k]})"

    def masks(self, ann_index: int, objects: Sequence[int] | None = None) -> np.ndarray:
        """Masks of `objects` (default all) on annotated frame `ann_index` [O, H, W] uint8.

        The RLEs are checked first (`checked_areas`): pycocotools decodes a short counts string into
        memory it never wrote."""
        frame = self.masklet[ann_index]
        objects = range(self.num_objects) if objects is None else objects
        self.checked_areas([(ann_index, k) for k in objects])
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
    masklet = [[None] * n if frame is None else frame for frame in masklet]  # a frame not annotated
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


def _frame_list(numbers: Sequence[int], shown: int = 5) -> str:
    return ", ".join(f"{int(m):05d}" for m in numbers[:shown]) + (" ..." if len(numbers) > shown else "")


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
    never raised: unreadable or inconsistent JSON, an RLE that is not a mask of the video's size (its
    `size`, or counts that do not add up to it), frames of another size, annotated frames without a
    frame; and, the video kept, annotated frames with a `None` mask (left out) and objects that are
    never visible (dropped).
    """
    try:
        parts = [read_sav_json(f) for f in files]
        ann = merge_annotations(parts)
    except SavError as e:
        return None, [Problem(name, str(e))]
    if ann.num_annotated == 0 or ann.num_objects == 0:
        return None, [Problem(name, "no annotated frames or no objects")]
    areas = []
    for part, path in zip(parts, files, strict=True):
        try:
            areas.append(part.areas())
        except SavError as e:
            return None, [Problem(name, f"{path}: {e}")]
    if frame_size is not None and tuple(frame_size) != (ann.height, ann.width):
        return None, [
            Problem(
                name, f"frames are {frame_size[0]}x{frame_size[1]} but the masks are {ann.height}x{ann.width}"
            )
        ]
    problems = []
    # SAM 2's loader reads a frame with a None mask as not annotated and leaves it out.
    annotated = np.array([all(r is not None for r in frame) for frame in ann.masklet])
    if not annotated.any():
        return None, [Problem(name, "every annotated frame holds a None mask")]
    if not annotated.all():
        shown = _frame_list(ann.frame_numbers[~annotated])
        problems.append(
            Problem(
                name, f"frames {shown} hold a None mask and were left out as not annotated", skipped=False
            )
        )
    by_number = {int(s): (i, s) for i, s in enumerate(stems) if s.isdigit()}
    numbers = ann.frame_numbers[annotated]
    missing = [int(f) for f in numbers if int(f) not in by_number]
    if missing:
        return None, [Problem(name, f"{len(missing)} annotated frames have no frame: {_frame_list(missing)}")]
    visible = np.concatenate(areas, axis=1)[annotated] > 0
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
    masks = []
    for p in positions:
        try:
            masks.append(ann.masks(int(entry.frame_numbers[p]) // ANN_EVERY, ids))
        except (SavError, IndexError) as e:  # the index checked every mask: the file changed since
            raise SavError(
                f"{', '.join(entry.annotation)}: video {entry.name}, frame {entry.stems[p]}: {e} (the file "
                "changed after the training set was indexed)"
            ) from e
    return np.stack(masks)


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

    def annotation_files(self) -> list[Path]:
        return [png for folder in self.object_dirs() for png in sorted(folder.glob("*.png"))]

    def unprompted_objects(self, prompted: set[int]) -> list[str]:
        return [d.name for d in self.object_dirs() if int(d.name) not in prompted]

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


@dataclasses.dataclass(frozen=True)
class SavSource(VideoSource):
    """SA-V as a `DatasetSource`: training videos of DATA.SAV_ROOT (annotations in DATA.ANNOTATION_DIR),
    evaluation videos of a val/test root."""

    name: ClassVar[str] = "sav"
    default: ClassVar[bool] = True
    root_key: ClassVar[str] = "DATA.SAV_ROOT"

    frames_root: str = ""
    annotation_dir: str = ""
    annotation: str = "manual"
    frame_skip: int = ANN_EVERY

    @classmethod
    def from_config(cls, cfg: Config) -> SavSource:
        data = cfg.DATA
        return cls(data.SAV_ROOT, data.ANNOTATION_DIR, data.ANNOTATION, data.FRAME_SKIP)

    def configured(self, store: StoreVideos | None) -> bool:
        return store is not None or self._root() is not None

    def _root(self) -> str | None:
        return self.frames_root if self.frames_root and Path(self.frames_root).is_dir() else None

    def index(self, store: StoreVideos | None, progress: bool) -> tuple[list[VideoEntry], list[Problem]]:
        """The videos of the frames root, or with a store every store video no other source took."""
        root = self._root()
        if store is None and root is None:
            raise PipelineError(f"{self.root_key}: frames folder not found: {self.frames_root!r}")
        if self.frame_skip % ANN_EVERY:
            raise PipelineError(
                f"DATA.FRAME_SKIP ({self.frame_skip}) must be a multiple of {ANN_EVERY}: SA-V masks exist "
                f"only on every {ANN_EVERY}th 24-fps frame"
            )
        videos = None if store is None else store.unclaimed
        entries, problems = scan_sav(
            root,
            self.annotation_dir or root,
            annotation=self.annotation,
            videos=videos,
            frame_stems=None if store is None else store.stems,
            progress=progress,
        )
        if store is not None:
            store.claim(videos)
        return entries, problems

    def load_masks(self, entry: VideoEntry, positions: Sequence[int], objects: Sequence[int]) -> np.ndarray:
        return load_masks(entry, positions, objects)

    @classmethod
    def dataset_dirs(cls, root: str | Path, resolution: str) -> tuple[Path, Path]:
        return dataset_dirs(root)

    @classmethod
    def list_sequences(cls, root: str | Path, split: str, resolution: str) -> list[str]:
        return list_sequences(root, split)

    @classmethod
    def open_video(cls, name: str, frame_paths: Sequence[Path], annotation_dir: Path) -> SavVideo:
        return SavVideo(name, tuple(frame_paths), annotation_dir)
