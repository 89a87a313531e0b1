"""J (region similarity) and F (boundary measure) as the official VOS evaluators compute them.

One per-frame kernel (host numpy, pure functions of two boolean masks) and the two official drivers'
frame/object selection on top of it:

* `davis_sequence` — davis2017-evaluation, semi-supervised task: objects 1..N with N the largest id of
  the first GT frame (255 is void and becomes background), first and last frame dropped, every object
  scored on every remaining frame (both empty scores 1), then Mean / Recall / Decay per object.
* `SavObjectScorer` — sam2 `sav_benchmark` / vos-benchmark: an object's list of values starts on the
  first frame where it is present in the GT or the prediction; only objects seen in the GT are reported.

Values are float64 and bit-identical to the official functions (the formulas, operand order and the
numpy reductions are the same), so the per-frame figures match their outputs exactly, not only to the
printed digits.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from es3_jax.errors import Es3Error

# Boundary tolerance as a fraction of the image diagonal (both tools' default).
BOUND_TH = 0.008


class EvalError(Es3Error):
    """Predictions that the official evaluators would reject (a missing frame, an unknown object id)."""


def region_similarity(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> float:
    """J: intersection over union of two binary masks [H, W], void pixels excluded; 1 when both are empty."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    keep = np.ones_like(gt) if void is None else ~void.astype(bool)
    inter = np.sum(pred & gt & keep)
    union = np.sum((pred | gt) & keep)
    if union == 0:
        return 1.0
    return float(inter / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """The official `_seg2bmap` [H, W] -> bool [H, W]: 1-px boundary, offset half a pixel to the origin.

    A pixel is on the boundary when it differs from its east, south or south-east neighbour; the last
    row compares east only, the last column south only, and the bottom-right pixel never counts.
    """
    seg = mask.astype(bool)
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    b[-1, :] = seg[-1, :] ^ east[-1, :]
    b[:, -1] = seg[:, -1] ^ south[:, -1]
    b[-1, -1] = False
    return b


def boundary_radius(height: int, width: int, bound_th: float = BOUND_TH) -> int:
    """Dilation radius in pixels: `ceil(bound_th * ||(H, W)||)`, or `bound_th` itself when it is >= 1."""
    if bound_th >= 1:
        if bound_th != int(bound_th):
            raise ValueError(
                f"an absolute boundary tolerance must be a whole number of pixels, got {bound_th}"
            )
        return int(bound_th)
    # sqrt of the exact integer sum of squares, as np.linalg.norm computes it for a 2-vector.
    return math.ceil(bound_th * math.sqrt(float(height * height + width * width)))


def dilate_disk(bmap: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation [H, W] -> [H, W] by the disk {dy² + dx² <= r²}; pixels outside the image are 0.

    Equal to cv2.dilate / skimage binary_dilation with skimage's `disk(r)`. The disk is a stack of
    horizontal runs, so it is computed as row-wise window maxima (prefix sums) OR-ed over row offsets.
    """
    h, w = bmap.shape
    out = np.zeros((h, w), dtype=bool)
    if radius <= 0 or not bmap.any():
        return bmap.astype(bool) if radius <= 0 else out
    prefix = np.zeros((h, w + 1), dtype=np.int32)
    np.cumsum(bmap, axis=1, out=prefix[:, 1:])
    cols = np.arange(w)
    runs: dict[int, np.ndarray] = {}
    for dy in range(-radius, radius + 1):
        half = math.isqrt(radius * radius - dy * dy)
        if half not in runs:
            hi = np.minimum(cols + half + 1, w)
            lo = np.maximum(cols - half, 0)
            runs[half] = (prefix[:, hi] - prefix[:, lo]) > 0
        run = runs[half]
        # out[y] |= run[y + dy]
        if dy >= 0:
            out[: h - dy] |= run[dy:]
        else:
            out[-dy:] |= run[: h + dy]
    return out


def _crop_to_boundaries(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both maps cropped to the bounding box of their union: the dilations are only ever read at
    boundary pixels, whose disk neighbourhoods that lie outside the box hold no boundary pixel."""
    rows = np.flatnonzero(a.any(axis=1) | b.any(axis=1))
    cols = np.flatnonzero(a.any(axis=0) | b.any(axis=0))
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return a[window], b[window]


def boundary_f_measure(
    pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None, bound_th: float = BOUND_TH
) -> float:
    """F: boundary F-measure of two binary masks [H, W] (DAVIS `f_measure`).

    Precision and recall count boundary pixels within a disk of radius `boundary_radius(H, W)` of the
    other mask's boundary. An empty boundary gives P = 1, R = 0 (prediction) or P = 0, R = 1 (GT), and
    P = R = 1 when both are empty; F = 0 when P + R = 0.
    """
    radius = boundary_radius(*pred.shape[:2], bound_th=bound_th)
    pred, gt = pred.astype(bool), gt.astype(bool)
    if void is not None:
        keep = ~void.astype(bool)
        pred, gt = pred & keep, gt & keep
    pred_b = boundary_map(pred)
    gt_b = boundary_map(gt)
    n_pred = int(pred_b.sum())
    n_gt = int(gt_b.sum())
    if n_pred == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_pred > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_pred == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        pred_b, gt_b = _crop_to_boundaries(pred_b, gt_b)
        precision = int(np.sum(pred_b & dilate_disk(gt_b, radius))) / float(n_pred)
        recall = int(np.sum(gt_b & dilate_disk(pred_b, radius))) / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def statistics(values: np.ndarray) -> tuple[float, float, float]:
    """Mean, Recall and Decay of one object's per-frame J or F values [N] (davis2017 `db_statistics`).

    Recall is the fraction of frames above 0.5. Decay is the mean of the first quarter of the frames
    minus the mean of the last quarter, with the official bin edges `round(linspace(1, N, 5) + 1e-10) - 1`.
    The official code casts those edges to uint8, which is garbage (and platform-dependent) beyond 256
    frames; here they stay integers, which is identical for N <= 256.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = float(np.nanmean(values))
        recall = float(np.nanmean(values > 0.5))
        edges = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.int64)
        bins = [values[edges[i] : edges[i + 1] + 1] for i in range(4)]
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


def davis_sequence(
    gt: Sequence[np.ndarray], pred: Sequence[np.ndarray], *, name: str = "", bound_th: float = BOUND_TH
) -> tuple[np.ndarray, np.ndarray]:
    """J and F of one sequence under davis2017-evaluation's semi-supervised protocol.

    gt: label maps [H, W] of every frame (palette indices; 255 = void). pred: label maps of frames
    1..T-2 only (the first and the last frame are never read). Returns J, F float64 [N, T-2] for objects
    1..N, N = the largest id on GT frame 0 after void removal. A predicted id above N is an error (the
    official tool exits); an id missing from the prediction scores as an empty mask.
    """
    shapes = {g.shape for g in gt}
    if len(shapes) != 1:
        raise EvalError(f"{name}: GT frames of different shapes {sorted(shapes)}")
    gt_maps = np.stack([np.where(g == 255, 0, g) for g in gt])
    num_objects = int(gt_maps[0].max())
    gt_maps = gt_maps[1:-1]
    if len(pred) != len(gt_maps):
        raise EvalError(f"{name}: {len(pred)} predicted frames for {len(gt_maps)} evaluated GT frames")
    pred_maps = np.stack(list(pred)) if len(pred) else np.zeros_like(gt_maps)
    if pred_maps.shape != gt_maps.shape:
        raise EvalError(f"{name}: prediction shape {pred_maps.shape[1:]} != GT shape {gt_maps.shape[1:]}")
    if pred_maps.size and int(pred_maps.max()) > num_objects:
        raise EvalError(
            f"{name}: predicted object id {int(pred_maps.max())} is higher than the number of objects "
            f"({num_objects}) on the first GT frame"
        )
    n_frames = gt_maps.shape[0]
    j = np.zeros((num_objects, n_frames))
    f = np.zeros((num_objects, n_frames))
    for k in range(num_objects):
        gt_k = gt_maps == k + 1
        pred_k = pred_maps == k + 1
        for t in range(n_frames):
            j[k, t] = region_similarity(pred_k[t], gt_k[t])
            f[k, t] = boundary_f_measure(pred_k[t], gt_k[t], bound_th=bound_th)
    return j, f


class SavObjectScorer:
    """The sav_benchmark / vos-benchmark per-video evaluator, fed one frame at a time.

    For each frame the set of ids seen so far in the GT or the prediction grows; every id in it gets a
    J and an F for the frame. `results()` keeps only ids that were in the GT on some fed frame.
    """

    def __init__(self, bound_th: float = BOUND_TH) -> None:
        self.bound_th = bound_th
        self.ids_in_gt: set[int] = set()
        self.ids_in_pred: set[int] = set()
        self.j: dict[int, list[float]] = {}
        self.f: dict[int, list[float]] = {}

    def feed(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """pred, gt: label maps [H, W] (booleans count as id 1)."""
        self.ids_in_gt.update(int(i) for i in np.unique(gt) if i != 0)
        self.ids_in_pred.update(int(i) for i in np.unique(pred) if i != 0)
        for obj in sorted(self.ids_in_gt | self.ids_in_pred):
            pred_k, gt_k = pred == obj, gt == obj
            self.j.setdefault(obj, []).append(region_similarity(pred_k, gt_k))
            self.f.setdefault(obj, []).append(boundary_f_measure(pred_k, gt_k, bound_th=self.bound_th))

    def results(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """id -> (J [n], F [n]) float64 for every id seen in the GT, ascending."""
        return {obj: (np.asarray(self.j[obj]), np.asarray(self.f[obj])) for obj in sorted(self.ids_in_gt)}
