"""J and F per frame against the official evaluators' own outputs, and the kernel's conventions."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from es3_jax.data.masks import read_palette_png
from es3_jax.eval import metrics

JF_REFERENCE = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "jf_reference"


@pytest.fixture(scope="module")
def reference_rows():
    path = JF_REFERENCE / "reference" / "per_frame_official_functions.csv"
    if not path.is_file():
        pytest.skip(f"fixture missing: {path}")
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_per_frame_j_and_f_equal_both_official_tools(reference_rows):
    """All 140 frames of the three sequences: J and F equal davis2017-evaluation's and sav_benchmark's."""
    worst = 0.0
    sequences = set()
    for row in reference_rows:
        seq, frame = row["sequence"], row["frame"]
        gt = read_palette_png(JF_REFERENCE / "gt_davis2016_raw" / seq / f"{frame}.png") > 0
        pred = read_palette_png(JF_REFERENCE / "pred_osvos" / seq / f"{frame}.png") == 1
        assert int(gt.sum()) == int(row["gt_area"]) and int(pred.sum()) == int(row["pred_area"])
        assert metrics.boundary_radius(*gt.shape) == int(row["bound_pix"])
        j = metrics.region_similarity(pred, gt)
        f = metrics.boundary_f_measure(pred, gt)
        for ours, tool in ((j, "J_davis2017"), (j, "J_sav"), (f, "F_davis2017"), (f, "F_sav")):
            worst = max(worst, abs(ours - float(row[tool])))
        sequences.add(seq)
    print(f"[jf] {len(reference_rows)} frames of {sorted(sequences)}: max |ours - official| = {worst:.1e}")
    assert len(reference_rows) == 140 and len(sequences) == 3
    assert worst <= 1e-12


def test_empty_prediction_on_last_drift_straight_frame_scores_zero(reference_rows):
    gt = read_palette_png(JF_REFERENCE / "gt_davis2016_raw" / "drift-straight" / "00049.png") > 0
    pred = read_palette_png(JF_REFERENCE / "pred_osvos" / "drift-straight" / "00049.png") == 1
    assert not pred.any() and gt.any()
    assert metrics.region_similarity(pred, gt) == 0.0
    assert metrics.boundary_f_measure(pred, gt) == 0.0


def test_empty_mask_conventions():
    empty = np.zeros((20, 30), bool)
    full = np.zeros((20, 30), bool)
    full[5:10, 5:15] = True
    assert metrics.region_similarity(empty, empty) == 1.0
    assert metrics.boundary_f_measure(empty, empty) == 1.0
    for a, b in ((empty, full), (full, empty)):
        assert metrics.region_similarity(a, b) == 0.0
        assert metrics.boundary_f_measure(a, b) == 0.0
    assert metrics.region_similarity(full, full) == 1.0 and metrics.boundary_f_measure(full, full) == 1.0


def test_void_pixels_are_excluded():
    gt = np.zeros((10, 10), bool)
    gt[2:6, 2:6] = True
    pred = gt.copy()
    pred[6:8, 2:6] = True  # 8 extra pixels, all void
    void = np.zeros_like(gt)
    void[6:8, :] = True
    assert metrics.region_similarity(pred, gt) == 16 / 24
    assert metrics.region_similarity(pred, gt, void) == 1.0
    assert metrics.boundary_f_measure(pred, gt, void) == 1.0


def test_boundary_radius_and_disk():
    assert metrics.boundary_radius(480, 854) == 8
    assert metrics.boundary_radius(480, 910) == 9
    assert metrics.boundary_radius(480, 1152) == 10
    assert metrics.boundary_radius(480, 854, bound_th=3) == 3
    point = np.zeros((17, 17), bool)
    point[8, 8] = True
    assert int(metrics.dilate_disk(point, 8).sum()) == 197  # skimage disk(8)


def test_boundary_map_conventions():
    seg = np.zeros((4, 5), bool)
    seg[1:3, 1:3] = True
    b = metrics.boundary_map(seg)
    # Pixels differing from their E, S or SE neighbour: the block's top-left neighbours and the block edges.
    expected = np.array(
        [
            [1, 1, 1, 0, 0],
            [1, 0, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0],
        ],
        bool,
    )
    np.testing.assert_array_equal(b, expected)
    full = np.ones((3, 3), bool)
    assert not metrics.boundary_map(full).any()
    corner = np.zeros((3, 3), bool)
    corner[2, 2] = True  # the bottom-right pixel is never a boundary
    b = metrics.boundary_map(corner)
    assert not b[2, 2] and b[1, 1] and b[2, 1] and b[1, 2]


@pytest.mark.parametrize("radius", [1, 2, 5, 8])
def test_dilate_disk_matches_brute_force(radius):
    rng = np.random.default_rng(radius)
    bmap = rng.random((37, 53)) < 0.01
    bmap[0, 0] = bmap[-1, -1] = bmap[0, -1] = True  # sources at the borders: outside pixels are 0
    expected = np.zeros_like(bmap)
    h, w = bmap.shape
    for y, x in zip(*np.nonzero(bmap), strict=True):
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                if dy * dy + dx * dx <= radius * radius and 0 <= y + dy < h and 0 <= x + dx < w:
                    expected[y + dy, x + dx] = True
    np.testing.assert_array_equal(metrics.dilate_disk(bmap, radius), expected)


def test_statistics_definitions():
    values = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    mean, recall, decay = metrics.statistics(values)
    assert mean == pytest.approx(0.65)
    assert recall == 5 / 8  # strictly above 0.5
    # N = 8: edges round([1, 2.75, 4.5, 6.25, 8] + 1e-10) - 1 = [0, 2, 4, 5, 7] (4.5 rounds up):
    # first bin [0:3], last bin [5:8].
    assert decay == pytest.approx(np.mean([1.0, 0.9, 0.8]) - np.mean([0.5, 0.4, 0.3]))
    assert all(math.isnan(v) for v in metrics.statistics(np.array([])))


def _square(n, size=10, offset=0):
    frames = []
    for t in range(n):
        m = np.zeros((40, 40), np.uint8)
        if t >= offset:
            m[5 : 5 + size, 5 : 5 + size] = 1
        frames.append(m)
    return frames


def test_drivers_differ_on_frames_before_an_object_appears():
    """davis2017 scores an absent object as J = 1 (both empty); sav_benchmark starts its list when it appears."""
    gt = [np.zeros((40, 40), np.uint8), *_square(4, offset=2), np.zeros((40, 40), np.uint8)]
    gt[0][0, 0] = 1  # the object exists on GT frame 0 for davis2017's object count
    pred = []
    for g in gt[1:-1]:
        p = g.copy()
        p[5:6, 5:15] = 0  # remove one row of 10 of the 100 pixels: IoU 0.9 where the object is present
        pred.append(p)
    j, _ = metrics.davis_sequence(gt, pred)
    assert j.shape == (1, 4)
    assert float(np.mean(j[0])) == pytest.approx(0.95)
    scorer = metrics.SavObjectScorer()
    for p, g in zip(pred, gt[1:-1], strict=True):
        scorer.feed(p, g)
    ((sav_j, _),) = scorer.results().values()
    assert len(sav_j) == 2 and float(np.mean(sav_j)) == pytest.approx(0.9)


def test_davis_driver_object_ids():
    first = np.zeros((40, 40), np.uint8)
    first[:2, :2] = 2  # N = 2: ids 1..2 are objects, even id 1 that frame 0 lacks
    first[5:7, 5:7] = 255  # void is background, not an object
    gt = [first, *_square(3)]
    pred = [np.zeros((40, 40), np.uint8)] * 2
    j, f = metrics.davis_sequence(gt, pred)
    assert j.shape == (2, 2)
    np.testing.assert_array_equal(j[0], 0.0)  # object 1 in the GT, missing from the prediction
    np.testing.assert_array_equal(j[1], 1.0)  # object 2 absent from both
    np.testing.assert_array_equal(f[1], 1.0)
    with pytest.raises(metrics.EvalError, match="higher than the number of objects"):
        metrics.davis_sequence(gt, [np.full((40, 40), 3, np.uint8)] * 2)
    raw = [np.where(g > 0, 255, 0).astype(np.uint8) for g in _square(4)]  # {0, 255} GT: void only
    j, _ = metrics.davis_sequence(raw, [np.zeros((40, 40), np.uint8)] * 2)
    assert j.shape == (0, 2)
