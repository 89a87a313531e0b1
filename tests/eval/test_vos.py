"""Dataset-level scoring against the official tools' result files, and the propagate-write-score loop."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from es3_jax.data import datasets
from es3_jax.data.masks import read_palette_png, write_palette_png
from es3_jax.eval import vos
from es3_jax.eval.metrics import EvalError

JF_REFERENCE = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "jf_reference"
SEQUENCES = ["blackswan", "car-shadow", "drift-straight"]


@pytest.fixture(scope="module")
def ref():
    if not (JF_REFERENCE / "reference").is_dir():
        pytest.skip(f"fixture missing: {JF_REFERENCE}")
    return JF_REFERENCE / "reference"


def _sav_layout(tmp: Path) -> tuple[Path, Path]:
    """The SA-V per-object layout of the fixture (links, no copies): raw {0, 255} GT, OSVOS predictions."""
    gt, pred = tmp / "gt", tmp / "pred"
    for seq in SEQUENCES:
        (gt / seq).mkdir(parents=True)
        (pred / seq).mkdir(parents=True)
        (gt / seq / "000").symlink_to((JF_REFERENCE / "gt_davis2016_raw" / seq).resolve())
        (pred / seq / "000").symlink_to((JF_REFERENCE / "pred_osvos" / seq).resolve())
    return gt, pred


def test_davis_layout_equals_davis2017_evaluation(ref, tmp_path):
    results = vos.score(JF_REFERENCE / "pred_osvos", JF_REFERENCE / "gt_davis2017fmt_derived", "davis")
    summary = vos.write_results(tmp_path, results, "davis")
    expected = json.loads((ref / "summary_full_precision.json").read_text())
    worst = 0.0
    for r in results:
        want = expected["per_sequence"][r.sequence]
        stats = r.stats()
        assert len(r.j) == want["n_eval_frames"]
        for ours, key in (("J-Mean", "J_mean"), ("J-Recall", "J_recall"), ("J-Decay", "J_decay"),
                          ("F-Mean", "F_mean"), ("F-Recall", "F_recall"), ("F-Decay", "F_decay"),
                          ("J&F-Mean", "JF_mean")):  # fmt: skip
            worst = max(worst, abs(stats[ours] - want[key]))
    glob = expected["global_mean_over_objects"]
    for ours, key in ((summary["J&F"], "JF_mean"), (summary["J"]["mean"], "J_mean"),
                      (summary["J"]["recall"], "J_recall"), (summary["J"]["decay"], "J_decay"),
                      (summary["F"]["mean"], "F_mean"), (summary["F"]["recall"], "F_recall"),
                      (summary["F"]["decay"], "F_decay")):  # fmt: skip
        worst = max(worst, abs(ours - glob[key]))
    print(f"[jf] davis layout: J&F {summary['J&F']!r} (official {glob['JF_mean']!r}), max diff {worst:.1e}")
    assert worst <= 1e-12
    # The official CSVs, byte for byte.
    for ours, theirs in (("global_results.csv", "davis2017-evaluation_global_results-val.csv"),
                         ("per-sequence_results.csv", "davis2017-evaluation_per-sequence_results-val.csv")):  # fmt: skip
        assert (tmp_path / ours).read_text() == (ref / theirs).read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["J&F"] == summary["J&F"]


@pytest.mark.parametrize("skip", [True, False], ids=["skipfirstlast", "noskip"])
@pytest.mark.parametrize("structure", ["savlayout", "davislayout"])
def test_sav_layout_equals_sam2_sav_evaluator(ref, tmp_path, structure, skip):
    if structure == "savlayout":
        gt, pred = _sav_layout(tmp_path / "in")
    else:
        gt, pred = JF_REFERENCE / "gt_davis2017fmt_derived", JF_REFERENCE / "pred_osvos"
    results = vos.score(pred, gt, "sav", skip_first_and_last=skip)
    summary = vos.write_results(tmp_path / "out", results, "sav")
    name = f"sam2_sav_evaluator_{structure}_{'skipfirstlast' if skip else 'noskip'}_results.csv"
    assert (tmp_path / "out" / "results.csv").read_text() == (ref / name).read_text()
    print(f"[jf] sav layout ({structure}, skip={skip}): J&F {100 * summary['J&F']:.1f}")
    by_seq = {r.sequence: r for r in results}
    n_frames = {"blackswan": 50, "car-shadow": 40, "drift-straight": 50}
    for seq, r in by_seq.items():
        assert len(r.j) == n_frames[seq] - (2 if skip else 0)
    # drift-straight's last prediction is empty: J = F = 0, counted only without the skip.
    last = by_seq["drift-straight"]
    if skip:
        assert last.j[-1] > 0 and last.f[-1] > 0
    else:
        assert last.j[-1] == 0.0 and last.f[-1] == 0.0
    if skip:
        expected = json.loads((ref / "summary_full_precision.json").read_text())["global_mean_over_objects"]
        assert abs(summary["J&F"] - expected["JF_mean"]) <= 1e-12


def test_raw_binary_gt_has_no_davis_objects(ref):
    with pytest.raises(EvalError, match=r"higher than the number of objects \(0\)"):
        vos.score(JF_REFERENCE / "pred_osvos", JF_REFERENCE / "gt_davis2016_raw", "davis", ["car-shadow"])


def test_missing_prediction_is_an_error(ref, tmp_path):
    pred = tmp_path / "pred" / "car-shadow"
    pred.mkdir(parents=True)
    for png in sorted((JF_REFERENCE / "pred_osvos" / "car-shadow").glob("*.png"))[:-2]:
        (pred / png.name).symlink_to(png.resolve())
    for layout in vos.LAYOUTS:
        with pytest.raises(EvalError, match=r"00038\.png"):
            vos.score(tmp_path / "pred", JF_REFERENCE / "gt_davis2017fmt_derived", layout, ["car-shadow"])


# ------------------------------------------------------------------------------------------------
# The propagate / write / score loop, with an oracle predictor that returns the ground truth.


def _blob(h, w, t, obj):
    m = np.zeros((h, w), bool)
    y, x = 4 + 3 * obj, 2 + 2 * t + 12 * obj
    m[y : y + 8, x : x + 9] = True
    return m


def _make_dataset(root: Path, dataset: str, num_frames=6, size=(32, 48)) -> dict:
    """A tiny dataset with two objects; on SA-V object 1 first appears on frame 2."""
    h, w = size
    frames_dir, ann_dir = (
        (root / "JPEGImages" / "480p", root / "Annotations" / "480p")
        if dataset == "davis"
        else (root / "JPEGImages_24fps", root / "Annotations_6fps")
    )
    truth = {}
    rng = np.random.default_rng(0)
    for t in range(num_frames):
        (frames_dir / "vid").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(frames_dir / "vid" / f"{t:05d}.jpg")
        present = {0: _blob(h, w, t, 0), 1: _blob(h, w, t, 1) if (dataset == "davis" or t >= 2) else None}
        truth[t] = {k: m for k, m in present.items() if m is not None}
        if dataset == "davis":
            ids = np.zeros((h, w), np.uint8)
            for k, m in truth[t].items():
                ids[m] = k + 1
            write_palette_png(ann_dir / "vid" / f"{t:05d}.png", ids)
        else:
            for k in (0, 1):
                m = truth[t].get(k, np.zeros((h, w), bool))
                write_palette_png(ann_dir / "vid" / f"{k:03d}" / f"{t:05d}.png", m.astype(np.uint8))
    return truth


class OraclePredictor:
    """The VideoPredictor contract; returns the ground truth of each object from its prompt frame on."""

    def __init__(self, truth, dataset):
        self.truth, self.dataset = truth, dataset
        self.timings = {"track_step": 0.0, "frames": 0}
        self.calls = []

    def init_state(self, video):
        self.calls.append(("init_state", Path(video).name))
        return {"prompts": {}}

    def add_new_mask(self, state, frame_idx, obj_id, mask):
        self.calls.append(("add_new_mask", frame_idx, obj_id))
        state["prompts"][obj_id] = frame_idx
        return frame_idx, list(state["prompts"]), None

    def propagate_in_video(self, state, start_frame_idx=None):
        key = (lambda obj: obj - 1) if self.dataset == "davis" else (lambda obj: obj)
        for t in range(start_frame_idx, len(self.truth)):
            ids = list(state["prompts"])
            logits = np.full((len(ids), 32, 48), -1024.0, np.float32)
            for i, obj in enumerate(ids):
                if t >= state["prompts"][obj] and key(obj) in self.truth[t]:
                    logits[i] = np.where(self.truth[t][key(obj)], 8.0, -8.0)
            self.timings["track_step"] += 2.0
            self.timings["frames"] += 1
            yield t, ids, logits


@pytest.mark.parametrize("dataset", ["davis", "sav"])
def test_propagate_write_score_with_an_oracle(tmp_path, dataset):
    truth = _make_dataset(tmp_path / "data", dataset)
    videos = datasets.open_dataset(dataset, tmp_path / "data")
    predictor = OraclePredictor(truth, dataset)
    timing = vos.propagate_dataset(predictor, videos, tmp_path / "pred")
    if dataset == "davis":
        assert predictor.calls[1:] == [("add_new_mask", 0, 1), ("add_new_mask", 0, 2)]
        written = read_palette_png(tmp_path / "pred" / "vid" / "00003.png")
        np.testing.assert_array_equal(written == 2, truth[3][1])
    else:
        # SA-V: object 1 joins on its first appearance, frame 2.
        assert predictor.calls[1:] == [("add_new_mask", 0, 0), ("add_new_mask", 2, 1)]
        assert not read_palette_png(tmp_path / "pred" / "vid" / "001" / "00001.png").any()
        np.testing.assert_array_equal(
            read_palette_png(tmp_path / "pred" / "vid" / "001" / "00004.png") > 0, truth[4][1]
        )
    assert timing["frames"] == 6 and timing["ms_per_frame"]["track_step"] == 2.0
    _, annotations = datasets.dataset_dirs(dataset, tmp_path / "data")
    results = vos.score(tmp_path / "pred", annotations, dataset)
    summary = vos.write_results(tmp_path / "out", results, dataset, timing)
    assert summary["num_objects"] == 2 and summary["J&F"] == 1.0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["fps"] == timing["fps"]
    assert "J&F 1.0000" in vos.format_summary(summary)


@pytest.mark.parametrize("dataset", ["davis", "sav"])
def test_a_prediction_of_another_size_is_named(tmp_path, dataset):
    _make_dataset(tmp_path / "data", dataset)
    _, annotations = datasets.dataset_dirs(dataset, tmp_path / "data")
    for gt in sorted(annotations.rglob("*.png")):  # a perfect prediction
        write_palette_png(tmp_path / "pred" / gt.relative_to(annotations), read_palette_png(gt))
    wrong = next((tmp_path / "pred").rglob("00002.png"))
    write_palette_png(wrong, np.zeros((16, 24), np.uint8))
    with pytest.raises(EvalError, match=rf"{wrong} is 24x16 but .*00002\.png is 48x32 \(width x height\)"):
        vos.score(tmp_path / "pred", annotations, dataset)


@pytest.mark.parametrize("dataset", ["davis", "sav"])
def test_an_annotated_frame_without_its_jpeg_is_named_when_the_dataset_opens(tmp_path, dataset):
    _make_dataset(tmp_path, dataset)
    frames, _ = datasets.dataset_dirs(dataset, tmp_path)
    (frames / "vid" / "00003.jpg").unlink()
    with pytest.raises(
        datasets.DatasetError,
        match=rf"vid: frame 00003 is annotated \(.*\) but has no JPEG in {frames / 'vid'}",
    ):
        datasets.open_dataset(dataset, tmp_path)


def test_an_object_empty_on_every_frame_is_neither_tracked_nor_scored(tmp_path):
    truth = _make_dataset(tmp_path / "data", "sav")
    empty = tmp_path / "data" / "Annotations_6fps" / "vid" / "002"
    for t in range(len(truth)):
        write_palette_png(empty / f"{t:05d}.png", np.zeros((32, 48), np.uint8))
    videos = datasets.open_dataset("sav", tmp_path / "data")
    assert vos.check_videos(videos) == {"vid": ["002"]}
    vos.propagate_dataset(OraclePredictor(truth, "sav"), videos, tmp_path / "pred")
    assert sorted(p.name for p in (tmp_path / "pred" / "vid").iterdir()) == ["000", "001"]
    _, annotations = datasets.dataset_dirs("sav", tmp_path / "data")
    results = vos.score(tmp_path / "pred", annotations, "sav", leave_out={"vid": ["002"]})
    assert [r.obj for r in results] == ["000", "001"] and vos.summarize(results, "sav")["J&F"] == 1.0


@pytest.mark.parametrize("dataset", ["davis", "sav"])
def test_a_gt_mask_of_another_size_than_the_frames_is_named_before_tracking(tmp_path, dataset):
    _make_dataset(tmp_path, dataset)
    _, annotations = datasets.dataset_dirs(dataset, tmp_path)
    png = sorted(annotations.rglob("00004.png"))[0]
    write_palette_png(png, np.zeros((32, 47), np.uint8))
    videos = datasets.open_dataset(dataset, tmp_path)
    with pytest.raises(
        EvalError, match=rf"{png} is 47x32 but the frames of vid are 48x32 \(width x height\)"
    ):
        vos.check_videos(videos)
    png.write_bytes(b"not a png")
    with pytest.raises(EvalError, match=rf"{png}: not a readable image"):
        vos.check_videos(videos)
