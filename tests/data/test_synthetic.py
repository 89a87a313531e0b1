"""Synthetic SA-V videos: deterministic, readable by the SA-V reader, learnable object sizes."""

import numpy as np
from PIL import Image

from es3_jax import cli
from es3_jax.data import sav, synthetic


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
