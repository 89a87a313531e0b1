"""SA-V: annotation parsing on the sam2 example video, the index's per-video problem reports, and the
val/test layout's first-appearance prompts."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from es3_jax.data import datasets, sav, synthetic
from es3_jax.data.masks import write_palette_png

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "sav_example"
MANUAL = FIXTURES / "sav_000001_manual.json"
AUTO = FIXTURES / "sav_000001_auto.json"

needs_fixture = pytest.mark.skipif(not MANUAL.is_file(), reason="fixture sav_example not available")


@needs_fixture
def test_manual_json_fields():
    ann = sav.read_sav_json(MANUAL)
    assert ann.video_id == "sav_000001"
    assert (ann.num_frames, ann.height, ann.width) == (483, 848, 480)
    assert ann.num_annotated == 121 and ann.num_objects == 5
    assert ann.frame_numbers[-1] == 480 and ann.frame_numbers[1] == 4
    assert ann.masklet_types == ("manual",) * 5 and ann.stability is None
    assert all(isinstance(f, int) for f in ann.first_appeared)
    # Object 3 first appears at annotated index 113 = 24-fps frame 452.
    assert ann.first_appeared[3] == 113
    areas = ann.areas()
    assert areas.shape == (121, 5)
    assert np.flatnonzero(areas[:, 3])[0] == 113 and ann.frame_numbers[113] == 452
    np.testing.assert_array_equal(
        [int(np.flatnonzero(areas[:, k])[0]) for k in range(5)], list(ann.first_appeared)
    )


@needs_fixture
def test_masks_shapes_areas_and_rle_round_trip():
    ann = sav.read_sav_json(MANUAL)
    masks = ann.masks(0)
    assert masks.shape == (5, 848, 480) and masks.dtype == np.uint8
    np.testing.assert_array_equal(masks.reshape(5, -1).sum(1), ann.areas()[0])
    assert masks[3].sum() == 0  # invisible = empty RLE
    raw = json.loads(MANUAL.read_text())["masklet"]
    for i in (0, 60, 113, 120):
        for k, m in enumerate(ann.masks(i)):
            assert sav.encode_mask(m) == raw[i][k]  # identical counts string
    # The masks of a subset, in the order asked for.
    np.testing.assert_array_equal(ann.masks(113, [3, 1]), ann.masks(113)[[3, 1]])
    assert sav.decode_rle(None, (4, 5)).shape == (4, 5)


@needs_fixture
def test_auto_and_both():
    auto = sav.read_sav_json(AUTO)
    assert auto.num_objects == 9 and auto.first_appeared == (0,) * 9
    assert auto.stability.shape == (121, 9)
    both = sav.merge_annotations([sav.read_sav_json(MANUAL), auto])
    assert both.num_objects == 14
    assert both.masklet_types == ("manual",) * 5 + ("auto",) * 9
    assert both.stability.shape == (121, 14) and np.isnan(both.stability[:, :5]).all()
    np.testing.assert_array_equal(both.masks(7, [6]), auto.masks(7, [1]))


def _write_frames(folder: Path, numbers, size=(848, 480)):
    folder.mkdir(parents=True)
    img = Image.new("RGB", (size[1], size[0]))
    for n in numbers:
        img.save(folder / f"{n:05d}.jpg")


@needs_fixture
def test_scan_reports_bad_videos_and_keeps_good_ones(tmp_path):
    """A good video is indexed; bad ones are reported per video and skipped."""
    root = tmp_path / "frames"
    ann_dir = tmp_path / "sav_train" / "sav_000"  # SA-V ships annotations in chunk subfolders
    ann_dir.mkdir(parents=True)
    good = list(range(0, 481, 4))
    data = json.loads(MANUAL.read_text())
    for name in ("good", "missing_frames", "wrong_size", "bad_rle", "never_visible", "broken"):
        d = dict(data, video_id=name)
        if name == "bad_rle":
            d["masklet"] = [list(f) for f in data["masklet"]]
            d["masklet"][5][0] = dict(d["masklet"][5][0], size=[100, 100])
        if name == "never_visible":  # object 2 drops out, the video stays
            empty = sav.encode_mask(np.zeros((848, 480), np.uint8))
            d["masklet"] = [[*f[:2], empty, *f[3:]] for f in data["masklet"]]
        text = json.dumps(d) if name != "broken" else "{not json"
        (ann_dir / f"{name}_manual.json").write_text(text)
        numbers = good[:-3] if name == "missing_frames" else good
        _write_frames(root / name, numbers, (480, 848) if name == "wrong_size" else (848, 480))
    _write_frames(root / "no_annotation", good[:2])
    entries, problems = sav.scan_sav(root, tmp_path / "sav_train")
    assert [e.name for e in entries] == ["good", "never_visible"]
    reasons = {p.video: p for p in problems}
    assert set(reasons) == {
        "missing_frames",
        "wrong_size",
        "bad_rle",
        "never_visible",
        "broken",
        "no_annotation",
    }
    assert "3 annotated frames have no frame" in reasons["missing_frames"].reason
    assert "frames are 480x848" in reasons["wrong_size"].reason
    assert "masklet[5][0] (frame 00020, object 0): RLE size [100, 100]" in reasons["bad_rle"].reason
    assert not reasons["never_visible"].skipped and "[2]" in reasons["never_visible"].reason
    assert "broken_manual.json" in reasons["broken"].reason
    e = entries[0]
    assert e.stems[113] == "00452" and e.frame_numbers[113] == 452 and e.frame_positions[113] == 113
    assert e.visible.shape == (121, 5) and e.objects == (0, 1, 2, 3, 4)
    assert entries[1].objects == (0, 1, 3, 4)
    masks = sav.load_masks(entries[1], [113, 114], [2])  # kept object 2 is annotation object 3
    ref = sav.read_sav_json(MANUAL)
    np.testing.assert_array_equal(masks[:, 0], np.stack([ref.masks(a, [3])[0] for a in (113, 114)]))


@needs_fixture
def test_scan_with_store_frame_names_and_both(tmp_path):
    """Frames named by an embedding store (all 24-fps frames): positions index that list."""
    (tmp_path / "ann").mkdir()
    shutil.copy(MANUAL, tmp_path / "ann" / MANUAL.name)
    shutil.copy(AUTO, tmp_path / "ann" / AUTO.name)
    stems = [f"{i:05d}" for i in range(483)]
    entries, problems = sav.scan_sav(
        None, tmp_path / "ann", annotation="both", frame_stems=lambda v: stems if v == "sav_000001" else None
    )
    assert not problems and len(entries) == 1
    e = entries[0]
    assert e.frame_positions[10] == 40 and e.stems[10] == "00040" and e.visible.shape == (121, 14)
    with pytest.raises(sav.SavError, match=r"DATA\.ANNOTATION"):
        sav.scan_sav(None, tmp_path / "ann", annotation="all", frame_stems=lambda v: stems)


def _sav_root(root: Path) -> Path:
    """SA-V val layout: 12 frames, annotations every 4th; object 1 appears on frame 8, object 2 never."""
    frames = root / "JPEGImages_24fps" / "sav_000001"
    frames.mkdir(parents=True)
    for t in range(12):
        Image.fromarray(np.full((16, 24, 3), 10 * t, np.uint8)).save(frames / f"{t:05d}.jpg")
    for t in range(0, 12, 4):
        for obj in range(3):
            m = np.zeros((16, 24), np.uint8)
            if obj == 0 or (obj == 1 and t >= 8):
                m[2:6, 3 + t : 8 + t] = 1
            write_palette_png(root / "Annotations_6fps" / "sav_000001" / f"{obj:03d}" / f"{t:05d}.png", m)
    (root / "Annotations_6fps" / "sav_000002").mkdir()
    (root / "JPEGImages_24fps" / "sav_000002").mkdir()
    return root


def test_sav_prompts_from_first_appearance(tmp_path):
    root = _sav_root(tmp_path)
    assert sav.list_sequences(root) == ["sav_000001", "sav_000002"]
    (root / "sav_val.txt").write_text("sav_000001\n")
    (video,) = datasets.open_dataset("sav", root)
    assert video.layout == "sav" and len(video) == 12
    prompts = video.prompts()
    assert [(p.frame_idx, p.obj_id) for p in prompts] == [(0, 0), (8, 1)]  # object 2 is never visible
    assert prompts[1].mask[2:6, 11:16].all() and prompts[1].mask.sum() == 20


def test_count_pixels_agrees_with_pycocotools_and_refuses_garbage():
    rng = np.random.default_rng(0)
    masks = [rng.random(rng.integers(1, 40, 2)) < p for p in rng.random(200)]
    rles = [sav.encode_mask(m) for m in masks]
    pixels, foreground = sav.count_pixels([r["counts"] for r in rles])
    np.testing.assert_array_equal(pixels, [m.size for m in masks])
    np.testing.assert_array_equal(foreground, [sav.rle_area(r) for r in rles])
    good = rles[0]["counts"]
    garbage = ["@@@garbage!!", "", "0o", "é1", "ooooooooo0", good[:-1], good + "1", "P13700000"]
    pixels, foreground = sav.count_pixels([good, *garbage, good])
    assert pixels[0] == pixels[-1] == masks[0].size and foreground[-1] == foreground[0]
    # Every damaged string is refused or does not add up to the mask's size.
    assert all(p in (-1,) or p != masks[0].size for p in pixels[1:-1]), pixels
    assert (pixels[1:6] == -1).all()


def _damage(root: Path, video: str, edit) -> None:
    path = root / f"{video}_manual.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_index_names_every_damaged_video(tmp_path):
    """Each kind of damage leaves its video out, named with the file and frame; a `None` mask leaves
    only its frame out, as SAM 2's loader does."""
    names = synthetic.make_synthetic(tmp_path, 8, num_frames=6, height=48, width=64)
    path = {name: tmp_path / f"{name}_manual.json" for name in names}
    path[names[1]].write_bytes(path[names[1]].read_bytes()[:200])
    _damage(tmp_path, names[2], lambda d: d["masklet"][3][0].update(size=[96, 128]))
    _damage(tmp_path, names[3], lambda d: d["masklet"][2].pop(0))
    path[names[4]].unlink()
    (tmp_path / names[5] / "00008.jpg").unlink()
    _damage(
        tmp_path, names[6], lambda d: [r.update(counts="@@@garbage!!") for f in d["masklet"][1:] for r in f]
    )
    _damage(tmp_path, names[7], lambda d: d["masklet"][3].__setitem__(0, None))

    entries, problems = sav.scan_sav(tmp_path)
    assert [e.name for e in entries] == [names[0], names[7]]
    reasons = {p.video: p.reason for p in problems if p.skipped}
    assert sorted(reasons) == names[1:7]
    assert f"{path[names[1]]}: cannot read the annotation JSON" in reasons[names[1]]
    assert "masklet[3][0] (frame 00012, object 0): RLE size [96, 128] differs" in reasons[names[2]]
    assert "masklet[2] has" in reasons[names[3]]
    assert f"no {names[4]}_manual.json" in reasons[names[4]]
    assert "annotated frames have no frame: 00008" in reasons[names[5]]
    assert (
        f"{path[names[6]]}: masklet[1][0] (frame 00004, object 0): RLE counts do not decode to a 48x64 mask"
        in (reasons[names[6]])
    )
    (kept,) = [p for p in problems if not p.skipped]
    assert kept.video == names[7] and "frames 00012 hold a None mask" in kept.reason
    entry = entries[1]
    assert entry.frame_numbers.tolist() == [0, 4, 8, 16, 20] and entry.stems[3] == "00016"
    ann = sav.read_sav_json(path[names[7]])
    np.testing.assert_array_equal(sav.load_masks(entry, [3], [0])[0], ann.masks(4, [entry.objects[0]]))


def test_a_file_changed_after_indexing_is_named_when_loaded(tmp_path):
    (name,) = synthetic.make_synthetic(tmp_path, 1, num_frames=4, height=48, width=64)
    (entry,), _ = sav.scan_sav(tmp_path)
    short = sav.encode_mask(np.ones((4, 4), bool))  # decodes into memory a 48x64 mask never had
    _damage(tmp_path, name, lambda d: d["masklet"][2][0].update(counts=short["counts"]))
    with pytest.raises(sav.SavError) as raised:
        sav.load_masks(entry, [1, 2], [0])
    message = str(raised.value)
    assert str(tmp_path / f"{name}_manual.json") in message and f"video {name}, frame 00008" in message
    assert "RLE counts do not decode to a 48x64 mask" in message
    path = tmp_path / f"{name}_manual.json"
    path.write_text(path.read_text()[:100])
    with pytest.raises(sav.SavError, match=f"{path}: cannot read the annotation JSON"):
        sav.load_masks(entry, [1], [0])
