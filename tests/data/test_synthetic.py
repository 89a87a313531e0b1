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
