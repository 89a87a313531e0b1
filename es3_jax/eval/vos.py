"""Semi-supervised VOS over a dataset: propagate a predictor, write its masks, score them, write the results.

Two layouts, each scored the way its official tool does (`es3_jax.eval.metrics`):

* `davis` — predictions `<pred_root>/<seq>/<frame>.png`, one palette PNG of object ids per frame,
  scored as davis2017-evaluation (semi-supervised task). Outputs `global_results.csv` and
  `per-sequence_results.csv` in its format (values 0-1, 3 decimals).
* `sav` — sam2's `sav_benchmark`: per-object folders `<pred_root>/<video>/<obj:03d>/<frame>.png` with
  binary PNGs (SA-V val/test), or DAVIS-style flat folders, detected per video as the tool does.
  Output `results.csv` in its format (values 0-100, 1 decimal).

Both also write `per-object_results.csv` (full precision, Mean / Recall / Decay of J and F per object)
and `summary.json` (J&F, J and F mean / recall / decay, values 0-1). On the `sav` layout the official
tool reports means only; the recall and decay given here apply davis2017's definitions to the same
per-object frame lists.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from es3_jax.data.masks import MaskFileError, logits_to_ids, read_palette_png, write_palette_png
from es3_jax.data.videos import VosVideo
from es3_jax.eval.metrics import EvalError, SavObjectScorer, davis_sequence, statistics
from es3_jax.progress import progress_bar

LAYOUTS = ("davis", "sav")


# --------------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class ObjectResult:
    """One object's per-frame J and F [n] over the frames its layout evaluates."""

    sequence: str
    obj: str  # davis: the id ("1"); sav: the object folder ("000") or the zero-padded id
    j: np.ndarray
    f: np.ndarray

    def stats(self) -> dict[str, float]:
        jm, jr, jd = statistics(self.j)
        fm, fr, fd = statistics(self.f)
        return {
            "J&F-Mean": (jm + fm) / 2,
            "J-Mean": jm,
            "J-Recall": jr,
            "J-Decay": jd,
            "F-Mean": fm,
            "F-Recall": fr,
            "F-Decay": fd,
        }


def _read_ids(path: Path) -> np.ndarray:
    """A mask PNG's ids [H, W], as both tools read it (`np.array(Image.open(path))` of a 2-D image)."""
    if not path.is_file():
        raise EvalError(f"prediction missing: {path} (every evaluated GT frame needs one)")
    return read_palette_png(path)


def _png_stems(folder: Path) -> list[str]:
    """PNG names of a folder without the extension, sorted as strings (both tools sort file names)."""
    return [name[:-4] for name in sorted(p.name for p in folder.iterdir() if p.name.endswith(".png"))]


def _check_sequences(pred_root: Path, gt_root: Path, sequences: Sequence[str]) -> None:
    for root, what in ((gt_root, "GT"), (pred_root, "prediction")):
        missing = [s for s in sequences if not (root / s).is_dir()]
        if missing:
            raise EvalError(f"{what} folder(s) missing under {root}: {', '.join(missing[:5])}")


def _same_size(path: Path, mask: np.ndarray, reference_path: Path, reference: np.ndarray) -> None:
    """EvalError naming both files and sizes (width x height, as image tools give them) unless the
    masks are the same size."""
    if mask.shape != reference.shape:
        (h, w), (rh, rw) = mask.shape[:2], reference.shape[:2]
        raise EvalError(f"{path} is {w}x{h} but {reference_path} is {rw}x{rh} (width x height)")


def score_davis(pred_root: str | Path, gt_root: str | Path, sequences: Sequence[str]) -> list[ObjectResult]:
    """davis2017-evaluation, semi-supervised: `gt_root/<seq>/*.png` palette GT, predictions alike."""
    pred_root, gt_root = Path(pred_root), Path(gt_root)
    _check_sequences(pred_root, gt_root, sequences)
    results = []
    for seq in sequences:
        stems = _png_stems(gt_root / seq)
        if len(stems) < 3:
            raise EvalError(
                f"{seq}: {len(stems)} GT frames; the first and last are not scored, so 3 are needed"
            )
        gt_paths = [gt_root / seq / f"{s}.png" for s in stems]
        gt = [read_palette_png(p) for p in gt_paths]
        for path, mask in zip(gt_paths[1:], gt[1:], strict=True):
            _same_size(path, mask, gt_paths[0], gt[0])
        pred = []
        for gt_path, gt_mask in zip(gt_paths[1:-1], gt[1:-1], strict=True):
            pred_path = pred_root / seq / gt_path.name
            pred.append(_read_ids(pred_path))
            _same_size(pred_path, pred[-1], gt_path, gt_mask)
        j, f = davis_sequence(gt, pred, name=seq)
        results.extend(ObjectResult(seq, str(k + 1), j[k], f[k]) for k in range(j.shape[0]))
    return results


def _sav_pair(gt_path: Path, pred_path: Path, per_object: bool) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = read_palette_png(gt_path), _read_ids(pred_path)
    _same_size(pred_path, pred, gt_path, gt)
    if per_object:
        for arr, p in ((gt, gt_path), (pred, pred_path)):
            if len(np.unique(arr)) > 2:
                raise EvalError(f"{p}: more than one object; the SA-V layout has one object mask per PNG")
        return gt > 0, pred > 0
    return gt, pred


def score_sav(
    pred_root: str | Path,
    gt_root: str | Path,
    sequences: Sequence[str],
    *,
    skip_first_and_last: bool = True,
    leave_out: Mapping[str, Collection[str]] | None = None,
) -> list[ObjectResult]:
    """sam2 `sav_benchmark`: per-object folders (SA-V) or flat palette PNGs (DAVIS-style), per video.
    `leave_out` names object folders of a sequence that are not scored (see `check_videos`)."""
    pred_root, gt_root = Path(pred_root), Path(gt_root)
    _check_sequences(pred_root, gt_root, sequences)
    leave_out = leave_out or {}
    results = []
    for seq in sequences:
        entries = sorted(p.name for p in (gt_root / seq).iterdir() if p.name not in leave_out.get(seq, ()))
        per_object = not all(name.endswith(".png") for name in entries)
        units = (
            [(name, gt_root / seq / name, pred_root / seq / name) for name in entries]
            if per_object
            else [(None, gt_root / seq, pred_root / seq)]
        )
        for obj_name, gt_dir, pred_dir in units:
            frames = sorted(p.name for p in gt_dir.iterdir())
            if skip_first_and_last:
                frames = frames[1:-1]
            scorer = SavObjectScorer()
            for frame in frames:
                gt, pred = _sav_pair(gt_dir / frame, pred_dir / frame, per_object)
                scorer.feed(pred, gt)
            found = scorer.results()
            if per_object:
                if len(found) != 1:
                    raise EvalError(
                        f"{seq}/{obj_name}: the object is empty in the GT on every evaluated frame "
                        "(the official evaluator fails on such an object too)"
                    )
                ((j, f),) = found.values()
                results.append(ObjectResult(seq, obj_name, j, f))
            else:
                results.extend(ObjectResult(seq, f"{obj:03d}", j, f) for obj, (j, f) in found.items())
    return results


def score(
    pred_root: str | Path,
    gt_root: str | Path,
    layout: str,
    sequences: Sequence[str] | None = None,
    *,
    skip_first_and_last: bool = True,
    leave_out: Mapping[str, Collection[str]] | None = None,
) -> list[ObjectResult]:
    """Score predictions against GT with `layout`'s official conventions. `sequences` defaults to
    every GT folder. The davis layout always drops the first and last frame (its only protocol).
    `leave_out`: SA-V object folders not scored, by sequence (see `check_videos`)."""
    gt_root = Path(gt_root)
    if layout not in LAYOUTS:
        raise EvalError(f"unknown layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    if not gt_root.is_dir():
        raise EvalError(f"GT folder not found: {gt_root}")
    if not Path(pred_root).is_dir():
        raise EvalError(f"prediction folder not found: {pred_root}")
    if sequences is None:
        sequences = sorted(p.name for p in gt_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not sequences:
        raise EvalError(f"no sequence folders in {gt_root}")
    try:
        if layout == "davis":
            return score_davis(pred_root, gt_root, sequences)
        return score_sav(
            pred_root, gt_root, sequences, skip_first_and_last=skip_first_and_last, leave_out=leave_out
        )
    except MaskFileError as e:
        raise EvalError(str(e)) from e


def summarize(results: Sequence[ObjectResult], layout: str) -> dict[str, Any]:
    """Dataset figures (0-1): object-weighted means of the per-object statistics; J&F = (J + F) / 2."""
    if not results:
        raise EvalError("no object was scored")
    rows = [r.stats() for r in results]
    columns = {k: np.array([row[k] for row in rows]) for k in rows[0]}
    if layout == "sav":
        # The tool's own order of operations: per-object means in percent, then their mean.
        j = float(np.array([np.mean(r.j) * 100 for r in results]).mean()) / 100
        f = float(np.array([np.mean(r.f) * 100 for r in results]).mean()) / 100
    else:
        j, f = float(np.mean(columns["J-Mean"])), float(np.mean(columns["F-Mean"]))
    return {
        "layout": layout,
        "J&F": (j + f) / 2,
        "J": {
            "mean": j,
            "recall": float(np.mean(columns["J-Recall"])),
            "decay": float(np.mean(columns["J-Decay"])),
        },
        "F": {
            "mean": f,
            "recall": float(np.mean(columns["F-Recall"])),
            "decay": float(np.mean(columns["F-Decay"])),
        },
        "num_sequences": len({r.sequence for r in results}),
        "num_objects": len(results),
    }


def davis_csvs(results: Sequence[ObjectResult]) -> tuple[str, str]:
    """(global, per-sequence) CSV text as davis2017-evaluation's `evaluation_method.py` writes them."""
    rows = [r.stats() for r in results]
    keys = ["J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
    means = {k: np.mean([row[k] for row in rows]) for k in keys}
    values = [(means["J-Mean"] + means["F-Mean"]) / 2, *(means[k] for k in keys)]
    global_csv = "J&F-Mean," + ",".join(keys) + "\n" + ",".join(f"{v:.3f}" for v in values) + "\n"
    per_seq = "Sequence,J-Mean,F-Mean\n" + "".join(
        f"{r.sequence}_{r.obj},{row['J-Mean']:.3f},{row['F-Mean']:.3f}\n"
        for r, row in zip(results, rows, strict=True)
    )
    return global_csv, per_seq


def sav_csv(results: Sequence[ObjectResult]) -> str:
    """`results.csv` text as sam2's `sav_benchmark` writes it (0-100, 1 decimal, padded columns)."""
    per_obj = [(r.sequence, r.obj, np.mean(r.j) * 100, np.mean(r.f) * 100) for r in results]
    global_j = np.array([p[2] for p in per_obj]).mean()
    global_f = np.array([p[3] for p in per_obj]).mean()
    width = max(*(len(p[0]) for p in per_obj), len("Global score"))
    lines = [
        f"{'sequence':<{width}},{'obj':>3}, {'J&F':>4}, {'J':>4}, {'F':>4}",
        f"{'Global score':<{width}},{'':>3}, {(global_j + global_f) / 2:.1f}, {global_j:.1f}, {global_f:.1f}",
    ]
    lines += [
        f"{seq:<{width}},{obj:>3}, {(j + f) / 2:>4.1f}, {j:>4.1f}, {f:>4.1f}" for seq, obj, j, f in per_obj
    ]
    return "\n".join(lines) + "\n"


def write_results(
    output_dir: str | Path, results: Sequence[ObjectResult], layout: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the layout's official CSV(s), `per-object_results.csv` and `summary.json`; returns the
    summary."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results, layout)
    if extra:
        summary.update(extra)
    if layout == "davis":
        global_csv, per_seq = davis_csvs(results)
        (out / "global_results.csv").write_text(global_csv)
        (out / "per-sequence_results.csv").write_text(per_seq)
    else:
        (out / "results.csv").write_text(sav_csv(results))
    with open(out / "per-object_results.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        header = list(results[0].stats())
        writer.writerow(["Sequence", "Object", *header, "Frames"])
        for r in results:
            stats = r.stats()
            writer.writerow([r.sequence, r.obj, *(repr(float(stats[k])) for k in header), len(r.j)])
    (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=True) + "\n")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    j, f = summary["J"], summary["F"]
    lines = [
        f"{summary['layout']} layout: {summary['num_objects']} objects "
        f"in {summary['num_sequences']} sequences",
        f"J&F {summary['J&F']:.4f}   J {j['mean']:.4f} (recall {j['recall']:.4f}, decay {j['decay']:.4f})   "
        f"F {f['mean']:.4f} (recall {f['recall']:.4f}, decay {f['decay']:.4f})",
    ]
    if "fps" in summary:
        lines.append(
            f"{summary['frames']} frames in {summary['seconds']:.1f} s: {summary['fps']:.2f} frames/s"
        )
        lines += [f"  {name}: {ms:.2f} ms/frame" for name, ms in summary.get("ms_per_frame", {}).items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Propagation


class Predictor(Protocol):
    """What `propagate_dataset` needs of `es3_jax.predictor.VideoPredictor`."""

    timings: dict[str, float]

    def init_state(self, video: Any) -> Any: ...

    def add_new_mask(self, state: Any, frame_idx: int, obj_id: int, mask: np.ndarray) -> Any: ...

    def propagate_in_video(
        self, state: Any, start_frame_idx: int | None = None
    ) -> Iterator[tuple[int, list[int], np.ndarray]]: ...


class _MaskWriter:
    """Writes one video's predicted masks in the dataset layout as frames arrive, and the empty masks of
    the frames (or objects) never predicted at the end, so the evaluators find a PNG for every frame."""

    def __init__(self, root: Path, video: VosVideo, obj_ids: Sequence[int], size: tuple[int, int]) -> None:
        self.dir = root / video.name
        self.layout = video.layout
        self.names = video.frame_names
        self.obj_ids = sorted(obj_ids)
        self.size = size
        self.written: set[int] = set()
        self.seconds = 0.0

    def write(self, frame_idx: int, obj_ids: Sequence[int], logits: np.ndarray) -> None:
        start = time.perf_counter()
        name = self.names[frame_idx]
        if self.layout == "davis":
            write_palette_png(self.dir / f"{name}.png", logits_to_ids(logits, obj_ids))
        else:
            # SA-V: one binary PNG per object; overlaps are allowed, so no non-overlap constraint.
            by_id = dict(zip(obj_ids, logits, strict=True))
            for obj in self.obj_ids:
                mask = by_id[obj] > 0 if obj in by_id else np.zeros(self.size, bool)
                write_palette_png(self.dir / f"{obj:03d}" / f"{name}.png", mask.astype(np.uint8))
        self.written.add(frame_idx)
        self.seconds += time.perf_counter() - start

    def finish(self) -> None:
        empty = np.zeros((0, *self.size), np.float32)
        for frame_idx in range(len(self.names)):
            if frame_idx not in self.written:
                self.write(frame_idx, [], empty)


def check_videos(videos: Iterable[VosVideo]) -> dict[str, list[str]]:
    """Before tracking, what would otherwise fail only once the predictions are scored. EvalError names
    a GT mask whose size differs from its video's frames (predictions are written at the frames' size,
    and neither official tool scores masks of two sizes), and a video with no object to track.

    Returns the SA-V objects (annotation folder names, by video) whose masks are empty on every
    annotated frame: they have no prompt, so nothing tracks them, and the official sav_benchmark stops
    on such an object; `score(..., leave_out=...)` leaves them out.
    """
    unprompted = {}
    for video in videos:
        height, width = _frame_size(video)
        for png in video.annotation_files():
            try:
                with Image.open(png) as im:  # the header only
                    size = im.size
            except OSError as e:
                raise EvalError(f"{png}: not a readable image: {e}") from e
            if size != (width, height):
                raise EvalError(
                    f"{png} is {size[0]}x{size[1]} but the frames of {video.name} are {width}x{height} "
                    "(width x height)"
                )
        prompted = {p.obj_id for p in video.prompts()}
        if not prompted:
            raise EvalError(f"{video.name}: no object to track (every annotated mask is empty)")
        empty = video.unprompted_objects(prompted)
        if empty:
            unprompted[video.name] = empty
    return unprompted


def _frame_size(video: VosVideo) -> tuple[int, int]:
    with Image.open(video.frame_paths[0]) as im:
        return im.height, im.width


def propagate_video(
    predictor: Predictor, video: VosVideo, pred_root: Path, progress: Any = None
) -> tuple[int, float]:
    """Track one video from its prompts and write its masks; returns (frames yielded, seconds writing).

    Every object is prompted on its own first frame before one forward pass from the earliest prompt:
    the predictor tracks an object from its prompt on (scores -1024 before it), so objects may join late.
    """
    prompts = video.prompts()
    if not prompts:
        raise EvalError(f"{video.name}: no object to track (empty first-frame annotation)")
    writer = _MaskWriter(pred_root, video, [p.obj_id for p in prompts], _frame_size(video))
    state = predictor.init_state(video.frame_paths[0].parent)
    for p in prompts:
        predictor.add_new_mask(state, p.frame_idx, p.obj_id, p.mask)
    frames = 0
    for frame_idx, obj_ids, logits in predictor.propagate_in_video(
        state, start_frame_idx=prompts[0].frame_idx
    ):
        writer.write(frame_idx, list(obj_ids), np.asarray(logits))
        frames += 1
        if progress is not None:
            progress.update(1)
    writer.finish()
    return frames, writer.seconds


def _timing_numbers(timings: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in timings.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def propagate_dataset(
    predictor: Predictor, videos: Iterable[VosVideo], pred_root: str | Path
) -> dict[str, Any]:
    """Run the semi-supervised protocol on every video, writing masks under `pred_root`.

    Returns timing figures: frames tracked, wall seconds, overall frames/s (everything included: frame
    loading, tracking, mask writing) and ms per frame of each predictor component and of the PNG writing.
    """
    videos = list(videos)
    pred_root = Path(pred_root)
    before = _timing_numbers(getattr(predictor, "timings", {}))
    frames, writing = 0, 0.0
    start = time.perf_counter()
    with progress_bar(sum(len(v) for v in videos), "es3 eval") as bar:
        for video in videos:
            bar.set_postfix_str(video.name)
            n, w = propagate_video(predictor, video, pred_root, bar)
            frames += n
            writing += w
    seconds = time.perf_counter() - start
    after = _timing_numbers(getattr(predictor, "timings", {}))
    per_frame = {
        k: (after[k] - before.get(k, 0.0)) / max(frames, 1)
        for k in after
        if k not in ("frames", "num_frames")
    }
    per_frame["write_masks"] = 1000 * writing / max(frames, 1)
    return {
        "frames": frames,
        "seconds": seconds,
        "fps": frames / seconds if seconds > 0 else math.nan,
        "ms_per_frame": per_frame,
    }
