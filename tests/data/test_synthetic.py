"""Synthetic SA-V videos and SA-1B images: deterministic, readable by their readers, masks that match
the picture, learnable object sizes."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from es3_jax import cli
from es3_jax.data import sa1b, sav, synthetic


def test_videos_are_deterministic_and_valid():
    frames_a, masks_a = synthetic.make_video(7, 2, num_frames=10, height=60, width=80)
    frames_b, masks_b = synthetic.make_video(7, 2, num_frames=10, height=60, width=80)
    np.testing.assert_array_equal(np.stack(frames_a), np.stack(frames_b))
    np.testing.assert_array_equal(np.array(masks_a), np.array(masks_b))
    assert not np.array_equal(
        np.stack(frames_a), np.stack(synthetic.make_video(7, 3, num_frames=10, height=60, width=80)[0])
    )
    for i in range(6):
        frames, masks = synthetic.make_video(0, i, num_frames=16, height=96, width=128)
        m = np.array(masks)  # [T, N, H, W]
        assert 1 <= m.shape[1] <= 3 and frames[0].shape == (96, 128, 3) and frames[0].dtype == np.uint8
        assert m[0].any(axis=(1, 2)).any() and m.any(axis=(0, 2, 3)).all()
        assert (m.sum(axis=1) <= 1).all()  # modal masks never overlap
        peak = m.sum(axis=(2, 3)).max(axis=0) / (96 * 128)
        assert (peak <= 0.3).all()


def test_written_dataset_reads_back(tmp_path):
    assert (
        cli.main(
            [
                "make-synthetic",
                "--output_dir",
                str(tmp_path),
                "--videos",
                "3",
                "--frames",
                "8",
                "--height",
                "48",
                "--width",
                "64",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    entries, problems = sav.scan_sav(tmp_path)
    assert not problems and [e.name for e in entries] == ["syn_000000", "syn_000001", "syn_000002"]
    frames, masks = synthetic.make_video(1, 1, num_frames=8, height=48, width=64)
    ann = sav.read_sav_json(tmp_path / "syn_000001_manual.json")
    assert (ann.num_annotated, ann.height, ann.width, ann.num_frames) == (8, 48, 64, 29)
    np.testing.assert_array_equal(ann.masks(5), np.array(masks[5]).astype(np.uint8))
    assert entries[1].stems[-1] == "00028"
    jpeg = np.asarray(Image.open(tmp_path / "syn_000001" / "00020.jpg"), np.float32)
    assert np.abs(jpeg - frames[5]).mean() < 8  # frame 5 is the 24-fps frame 20, JPEG quality 95
    first = [int(np.flatnonzero(np.array(masks)[:, k].any(axis=(1, 2)))[0]) for k in range(ann.num_objects)]
    assert list(ann.first_appeared) == first


def test_style_changes_the_paint_and_the_sizes_not_the_motion():
    textured, masks = synthetic.make_video(4, 0, num_frames=6, height=96, width=128)
    flat, flat_masks = synthetic.make_video(
        4, 0, num_frames=6, height=96, width=128, style=synthetic.Style(textured=False)
    )
    np.testing.assert_array_equal(np.array(flat_masks), np.array(masks))
    for t in range(6):
        for m in masks[t]:
            inner = m & np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)
            if inner.sum() > 20:
                assert len(np.unique(flat[t][inner], axis=0)) == 1, "a flat object shows more than one colour"
                assert len(np.unique(textured[t][inner], axis=0)) > 1, "a textured object shows one colour"
    big = synthetic.Style(min_area=0.1, max_area=0.12)
    for i in range(4):
        _, m = synthetic.make_video(5, i, num_frames=1, height=96, width=128, style=big)
        # Frame 0 of an object that starts inside the frame and on top shows its full area.
        areas = np.array(m[0]).sum(axis=(1, 2)) / (96 * 128)
        assert areas.max() <= 0.12 * 1.21 + 0.01 and areas.max() >= 0.1 * 0.81 - 0.01


def _inner(mask: np.ndarray) -> np.ndarray:
    """The pixels of `mask` whose four neighbours are in it too."""
    return mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)


def test_sa1b_images_masks_agree_with_the_picture():
    """Flat objects: each object mask is one colour, parts nest in their objects, the speck and the
    background complete the picture; the same (seed, index) draws the same image."""
    flat = synthetic.Style(textured=False)
    for i in range(6):
        made = synthetic.make_image(2, i, height=72, width=96, style=flat)
        kinds, masks = np.array(made.kinds), made.masks
        objects = masks[kinds == "object"]
        assert 3 <= len(objects) <= 8 and (objects.sum(axis=0) <= 1).all()  # modal masks never overlap
        for k in np.flatnonzero(kinds == "object"):
            inner = _inner(masks[k])
            assert inner.sum() > 0 and len(np.unique(made.image[inner], axis=0)) == 1
        for k in np.flatnonzero(kinds == "part"):
            (whole,) = masks[(kinds == "object") & (np.array(made.owners) == made.owners[k])]
            assert whole.sum() > masks[k].sum() > 0 and not (masks[k] & ~whole).any()
        (speck,) = masks[kinds == "speck"]
        (background,) = masks[kinds == "background"]
        assert 4 <= speck.sum() <= 9 and len(np.unique(made.image[speck], axis=0)) == 1
        np.testing.assert_array_equal(objects.sum(axis=0) + speck + background, 1)
        assert ((made.predicted_iou >= 0.6) & (made.predicted_iou <= 1)).all()
        assert ((made.stability_score >= 0.6) & (made.stability_score <= 1)).all()
    a = synthetic.make_image(5, 1, height=48, width=64)
    b = synthetic.make_image(5, 1, height=48, width=64)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    textured = synthetic.make_image(2, 0, height=72, width=96)
    inner = _inner(textured.masks[textured.kinds.index("object")])
    assert len(np.unique(textured.image[inner], axis=0)) > 1


def _sa1b_cli(output_dir, *extra: str) -> int:
    size = ["--height", "48", "--width", "64"]
    return cli.main(["make-synthetic", "--layout", "sa1b", "--output_dir", str(output_dir), *size, *extra])


def test_sa1b_cli_writes_the_layout_deterministically(tmp_path, capsys):
    assert _sa1b_cli(tmp_path / "a", "--images", "3", "--seed", "4", "--flat") == 0
    assert _sa1b_cli(tmp_path / "b", "--videos", "3", "--seed", "4", "--flat") == 0
    assert _sa1b_cli(tmp_path / "c", "--images", "3", "--seed", "5", "--flat") == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["sa_1.jpg", "sa_1.json", "sa_2.jpg", "sa_2.json", "sa_3.jpg", "sa_3.json"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "sa_1.jpg").read_bytes() != (tmp_path / "c" / "sa_1.jpg").read_bytes()
    entries, problems = sa1b.scan_sa1b(tmp_path / "a")
    assert not problems and [e.name for e in entries] == ["sa_1", "sa_2", "sa_3"]
    made = synthetic.make_image(4, 1, height=48, width=64, style=synthetic.Style(textured=False))
    ann = sa1b.read_sa1b_json(entries[1].json_path)
    assert (ann.image_id, ann.file_name) == (2, "sa_2.jpg")
    np.testing.assert_array_equal(ann.masks(range(len(ann))), made.masks.astype(np.uint8))
    record = json.loads(Path(entries[1].json_path).read_text())["annotations"]
    for a, mask in zip(record, made.masks, strict=True):
        ys, xs = np.nonzero(mask)
        assert a["area"] == ys.size and a["crop_box"] == [0, 0, 64, 48]
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        (x, y), *_ = a["point_coords"]
        assert mask[int(y), int(x)]
    jpeg = sa1b.load_image(entries[1], ann).astype(np.float32)
    assert np.abs(jpeg - made.image).mean() < 12  # JPEG quality 95 of a noisy background
    for k in np.flatnonzero(np.array(made.kinds) == "object"):  # the written masks fit the written image
        inner = _inner(_inner(made.masks[k]))  # off the edge that JPEG's 2x2 colour blocks blur
        if inner.sum() > 20:
            assert np.abs(jpeg[inner].mean(axis=0) - made.image[inner][0]).max() < 6
    assert cli.main(["make-synthetic", "--output_dir", str(tmp_path / "d"), "--images", "2"]) == 2
    assert "--images is for --layout sa1b" in capsys.readouterr().err
