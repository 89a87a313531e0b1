"""SA-1B: masks decoded as pycocotools decodes them, filters that select what their thresholds say, the
index's pairing of images and JSONs, and errors that name the file at fault."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from es3_jax.data import sa1b, synthetic
from es3_jax.data.sav import encode_mask
from es3_jax.data.videos import DatasetError

H, W = 56, 72


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Five generated images across the root and two tar-like subfolders; the set is never changed."""
    root = tmp_path_factory.mktemp("sa1b")
    synthetic.make_sa1b(root / "sa_000000", 2, seed=3, height=H, width=W)
    for i in (2, 3):
        synthetic.write_image(root / "sa_000001", i, seed=3, height=H, width=W)
    synthetic.write_image(root, 4, seed=3, height=H, width=W)
    return root


@pytest.fixture
def copy(dataset, tmp_path) -> Path:
    """A copy of the dataset that a test may break."""
    return Path(shutil.copytree(dataset, tmp_path / "copy"))


def _raw(path) -> dict:
    with open(path) as f:
        return json.load(f)


def _write(path, data) -> None:
    Path(path).write_text(json.dumps(data))


def test_scan_pairs_images_and_jsons_across_subfolders(dataset):
    entries, problems = sa1b.scan_sa1b(dataset)
    assert not problems
    assert [e.name for e in entries] == ["sa_1", "sa_2", "sa_3", "sa_4", "sa_5"]
    assert entries[2] == sa1b.Sa1bImage(
        "sa_3", str(dataset / "sa_000001" / "sa_3.jpg"), str(dataset / "sa_000001" / "sa_3.json")
    )
    assert entries[4].image_path == str(dataset / "sa_5.jpg")


def test_masks_decode_as_pycocotools_does(dataset):
    entries, _ = sa1b.scan_sa1b(dataset)
    for entry in entries:
        ann = sa1b.read_sa1b_json(entry.json_path)
        raw = _raw(entry.json_path)
        assert (ann.image_id, ann.file_name, ann.height, ann.width) == (
            raw["image"]["image_id"],
            f"{entry.name}.jpg",
            H,
            W,
        )
        keep = ann.select(sa1b.AnnotationFilter())
        assert keep.dtype == np.int64 and list(keep) == list(range(len(raw["annotations"])))
        masks = ann.masks(keep)
        assert masks.shape == (len(keep), H, W) and masks.dtype == np.uint8
        for k, i in enumerate(keep):
            expected = mask_utils.decode(raw["annotations"][i]["segmentation"])
            assert np.array_equal(masks[k], expected)
            assert masks[k].sum() == raw["annotations"][i]["area"]
        assert np.array_equal(ann.masks([2, 0]), masks[[2, 0]])  # the order asked for
        image = sa1b.load_image(entry, ann)
        assert image.shape == (H, W, 3) and image.dtype == np.uint8


FILTERS = [
    sa1b.AnnotationFilter(),
    sa1b.AnnotationFilter(min_area=0.01),
    sa1b.AnnotationFilter(max_area=0.3),
    sa1b.AnnotationFilter(min_area=0.005, max_area=0.1),
    sa1b.AnnotationFilter(min_predicted_iou=0.88),
    sa1b.AnnotationFilter(min_stability_score=0.95),
    sa1b.AnnotationFilter(min_area=0.002, max_area=0.5, min_predicted_iou=0.8, min_stability_score=0.9),
]


def test_filters_select_what_they_say(copy):
    """Against a selection from the raw JSON fields; an added mask of area 0 passes no filter."""
    path = copy / "sa_000000" / "sa_1.json"
    data = _raw(path)
    empty = encode_mask(np.zeros((H, W), bool))
    data["annotations"].insert(1, {**data["annotations"][0], "segmentation": empty, "area": 0})
    _write(path, data)
    entries, _ = sa1b.scan_sa1b(copy)
    raw = {e.name: _raw(e.json_path)["annotations"] for e in entries}
    total = sum(len(a) for a in raw.values())
    for filt in FILTERS:
        kept = 0
        for entry in entries:
            expected = [
                i
                for i, a in enumerate(raw[entry.name])
                if a["area"] > 0
                and filt.min_area <= a["area"] / (H * W) <= filt.max_area
                and a["predicted_iou"] >= filt.min_predicted_iou
                and a["stability_score"] >= filt.min_stability_score
            ]
            got = sa1b.read_sa1b_json(entry.json_path).select(filt)
            assert list(got) == expected, (filt, entry.name)
            kept += len(got)
        if filt == sa1b.AnnotationFilter():
            assert kept == total - 1  # all but the mask of area 0
        else:  # the generated scores and sizes spread across each threshold
            assert 0 < kept < total - 1, f"{filt} keeps {kept} of {total} masks"
    assert 1 not in sa1b.read_sa1b_json(path).select(sa1b.AnnotationFilter())
    with pytest.raises(sa1b.Sa1bError, match="min_area"):
        sa1b.AnnotationFilter(min_area=0.5, max_area=0.1)


def test_scan_reports_a_missing_json_or_jpg(copy):
    (copy / "sa_000000" / "sa_2.json").unlink()
    (copy / "sa_000001" / "sa_3.jpg").unlink()
    entries, problems = sa1b.scan_sa1b(copy)
    assert [e.name for e in entries] == ["sa_1", "sa_4", "sa_5"]
    assert [p.video for p in problems] == ["sa_2", "sa_3"] and all(p.skipped for p in problems)
    assert str(copy / "sa_000000" / "sa_2.json") in problems[0].reason
    assert str(copy / "sa_000001" / "sa_3.jpg") in problems[1].reason
    with pytest.raises(DatasetError, match="not found"):
        sa1b.scan_sa1b(copy / "nowhere")
    (copy / "empty").mkdir()
    with pytest.raises(DatasetError, match="no sa_"):
        sa1b.scan_sa1b(copy / "empty")


def test_bad_json_errors_name_the_file(copy):
    path = copy / "sa_5.json"
    good = _raw(path)
    path.write_text(json.dumps(good)[:-20])
    with pytest.raises(sa1b.Sa1bError, match=f"{path}: cannot read"):
        sa1b.read_sa1b_json(path)

    def broken(change) -> sa1b.Sa1bError:
        data = json.loads(json.dumps(good))
        change(data)
        _write(path, data)
        with pytest.raises(sa1b.Sa1bError) as e:
            sa1b.read_sa1b_json(path)
        assert str(path) in str(e.value)
        return e.value

    assert "'annotations'" in str(broken(lambda d: d.pop("annotations")))
    assert "'image'" in str(broken(lambda d: d.pop("image")))
    assert "image.height" in str(broken(lambda d: d["image"].pop("height")))
    error = str(broken(lambda d: d["annotations"][2].pop("predicted_iou")))
    assert "annotations[2]" in error and "predicted_iou" in error
    error = str(broken(lambda d: d["annotations"][3].update(stability_score="high")))
    assert "annotations[3].stability_score" in error
    error = str(broken(lambda d: d["annotations"][0]["segmentation"].pop("counts")))
    assert "annotations[0].segmentation" in error


def test_rle_of_another_size_or_short_counts(copy):
    path = copy / "sa_5.json"
    data = _raw(path)
    data["annotations"][1]["segmentation"] = encode_mask(np.ones((H + 1, W), bool))
    counts = data["annotations"][2]["segmentation"]["counts"]
    data["annotations"][2]["segmentation"]["counts"] = counts[: len(counts) // 2]
    _write(path, data)
    ann = sa1b.read_sa1b_json(path)  # reading checks fields; the masks are checked when decoded
    ann.masks([0, 3])
    with pytest.raises(sa1b.Sa1bError, match=rf"{path}: annotations\[1\].*size \[{H + 1}, {W}\]"):
        ann.masks([0, 1])
    with pytest.raises(sa1b.Sa1bError, match=rf"{path}: annotations\[2\].*do not decode"):
        ann.masks([2])
    with pytest.raises(sa1b.Sa1bError, match=f"{path}: no annotation 99"):
        ann.masks([99])


def test_image_of_another_size_than_its_json(copy):
    entries, _ = sa1b.scan_sa1b(copy)
    entry = entries[-1]
    Image.new("RGB", (W, H + 2)).save(entry.image_path)
    with pytest.raises(sa1b.Sa1bError, match=rf"{entry.image_path}: the image is {H + 2}x{W}"):
        sa1b.load_image(entry, sa1b.read_sa1b_json(entry.json_path))
