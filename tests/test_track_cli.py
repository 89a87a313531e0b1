"""`es3 track` end to end on the real-frame fixtures, a video file and a stream, with the tiny
random-weight config."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest

from es3_jax import config as config_lib
from es3_jax.cli import main
from es3_jax.data.masks import read_palette_png, write_palette_png
from es3_jax.data.video_file import VideoFile
from es3_jax.predictor.frame_sources import FrameSourceError, open_video
from tests.data.test_video_file import prompt_masks, remux_nut, write_clip

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / ".." / "shared" / "fixtures"
TINY = str(REPO / "configs" / "tiny.yaml")


def _needs(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"fixture absent: {path}")
    return path


def test_track_bedroom_single_mask(tmp_path):
    frames = _needs(FIXTURES / "bedroom_frames")
    ids = np.zeros((540, 960), np.uint8)
    ids[300:400, 150:270] = 1

    mask = write_palette_png(tmp_path / "prompt.png", ids)
    out = tmp_path / "out"
    rc = main(["track", "--frames", str(frames), "--mask", str(mask), "--output_dir", str(out), "--save_logits",
               "--config", TINY, "MODEL.TEACHER.IMAGE_SIZE", "112", "MODEL.TRUNK.PRETRAIN_IMAGE_SIZE", "56"])  # fmt: skip
    assert rc == 0
    pngs = sorted((out / "masks").glob("*.png"))
    assert len(pngs) == 32 and read_palette_png(pngs[0]).shape == (540, 960)
    # The prompt frame shows the prompt, through the low-res round trip upstream makes.
    first = read_palette_png(pngs[0]) == 1
    assert (first & (ids == 1)).sum() / (first | (ids == 1)).sum() > 0.9
    logits = np.load(out / "logits" / "00005.npz")
    assert logits["logits"].shape == (1, 540, 960) and logits["obj_ids"].tolist() == [1]
    assert (out / "overlay_grid.png").stat().st_size > 0 and (out / "overlay.gif").stat().st_size > 0
    # A folder's frames carry no times: overlay.mp4 shows them at --fps (24).
    overlay = VideoFile(out / "overlay.mp4")
    assert overlay.video_size == (540, 960) and overlay.timestamps.tolist() == [i / 24 for i in range(32)]


def test_track_judo_objects_join_later(tmp_path, capsys):
    """Four objects in batches of 3 (two banks, the second padded)."""
    root = _needs(FIXTURES / "cutie_examples")
    out = tmp_path / "out"
    rc = main(["track", "--frames", str(root / "images" / "judo"), "--mask", str(root / "masks" / "judo"),
               "--output_dir", str(out), "--objects_per_batch", "3", "--config", TINY,
               "MODEL.TEACHER.IMAGE_SIZE", "112", "MODEL.TRUNK.PRETRAIN_IMAGE_SIZE", "56"])  # fmt: skip
    assert rc == 0
    masks = {p.stem: read_palette_png(p) for p in (out / "masks").glob("*.png")}
    assert len(masks) == 16 and all(m.shape == (480, 854) for m in masks.values())
    # Objects 2, 3, 4 join on frames 5, 8, 13 (00005.png is 853 px wide and is resized).
    assert set(np.unique(masks["00000"])) <= {0, 1}
    assert (
        2 in np.unique(masks["00005"]) and 3 in np.unique(masks["00008"]) and 4 in np.unique(masks["00013"])
    )
    assert not ({2, 3, 4} & set(np.unique(masks["00004"])))
    # The resize is said, naming the PNG and both sizes.
    assert "00005.png is 853x480 (width x height) but the frames are 854x480" in capsys.readouterr().err


def test_track_errors_name_the_problem(tmp_path, capsys):
    frames = _needs(FIXTURES / "bedroom_frames")
    rc = main(["track", "--frames", str(frames), "--mask", str(tmp_path / "nope.png"), "--output_dir",
               str(tmp_path / "o"), "--config", TINY])  # fmt: skip
    assert rc == 2 and "nope.png" in capsys.readouterr().err


def test_frames_of_another_size_are_refused_before_anything_is_written(tmp_path, capsys):
    """Masks are written at the video's size (frame 0's) and shown over each frame: a frame of
    another size is named, with both sizes, before tracking starts."""
    from PIL import Image

    bedroom = _needs(FIXTURES / "bedroom_frames")
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(6):
        (frames / f"{i:05d}.jpg").symlink_to((bedroom / f"{i:05d}.jpg").resolve())
    (frames / "00003.jpg").unlink()
    with Image.open(bedroom / "00003.jpg") as im:
        im.resize((480, 270)).save(frames / "00003.jpg")
    ids = np.zeros((540, 960), np.uint8)
    ids[300:400, 150:270] = 1
    mask = write_palette_png(tmp_path / "prompt.png", ids)
    out = tmp_path / "out"
    rc = main(["track", "--frames", str(frames), "--mask", str(mask), "--output_dir", str(out), "--config", TINY,
               "MODEL.TEACHER.IMAGE_SIZE", "112", "MODEL.TRUNK.PRETRAIN_IMAGE_SIZE", "56"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "00000.jpg is 960x540" in err and "00003.jpg is 480x270" in err, err
    assert not out.exists()
    with pytest.raises(FrameSourceError, match=r"00003\.jpg is 480x270"):  # the predictor's own check
        open_video(frames, config_lib.load(TINY), trunk=None, timed=None)


SMALL = ["--config", TINY, "MODEL.TEACHER.IMAGE_SIZE", "112", "MODEL.TRUNK.PRETRAIN_IMAGE_SIZE", "56"]


def _prompt_png(path: Path) -> Path:
    ids = np.zeros((96, 128), np.uint8)
    for obj_id, mask in prompt_masks().items():
        ids[mask] = obj_id
    return write_palette_png(path, ids)


def test_track_a_video_file_and_the_same_stream_on_stdin(tmp_path, monkeypatch, capsys):
    """A video file: masks named by frame index, and overlay.mp4 with the file's frame times
    (variable frame rate). The same frames streamed on stdin (`--frames -`) give the same masks and
    overlay frames, written as the frames arrive, up to --max_frames."""
    frames = 12  # 25 fps, a pause, 100 fps, a gap
    clip = write_clip(tmp_path / "clip.mp4", frames=frames)
    prompt = _prompt_png(tmp_path / "prompt.png")
    out = tmp_path / "file"
    assert (
        main(["track", "--frames", str(clip), "--mask", str(prompt), "--output_dir", str(out), *SMALL]) == 0
    )
    names = sorted(p.name for p in (out / "masks").glob("*.png"))
    assert names == [f"{i:05d}.png" for i in range(frames)]
    first = read_palette_png(out / "masks" / "00000.png")
    for obj_id, mask in prompt_masks().items():
        assert ((first == obj_id) & mask).sum() / ((first == obj_id) | mask).sum() > 0.9
    overlay = VideoFile(out / "overlay.mp4")
    assert overlay.num_frames == frames
    assert overlay.timestamps.tolist() == VideoFile(clip).timestamps.tolist()
    assert (out / "overlay_grid.png").exists() and not (out / "overlay.gif").exists()

    n = 8
    streamed = tmp_path / "stream"
    with remux_nut(clip, tmp_path / "clip.nut").open("rb") as stdin:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(stdin))
        rc = main(["track", "--frames", "-", "--mask", str(prompt), "--output_dir", str(streamed),
                   "--max_frames", str(n), *SMALL])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in (streamed / "masks").glob("*.png"))
    assert names == [f"{i:05d}.png" for i in range(n)]
    for name in names:
        assert np.array_equal(
            read_palette_png(streamed / "masks" / name), read_palette_png(out / "masks" / name)
        )
    # The overlays show the same frames at the same times (the stream's, from its first frame).
    # H.264 encodes a frame by the frames around it, so 10 frames are not bit-equal to 24: measured,
    # a mean difference of at most 0.34 per value for the same frame, at least 2.9 for the next one.
    overlay_stream = VideoFile(streamed / "overlay.mp4")
    assert np.allclose(overlay_stream.timestamps, overlay.timestamps[:n], atol=1e-4)
    for i in range(n):
        assert np.abs(overlay_stream.frame(i).astype(int) - overlay.frame(i)).mean() < 1, i


def test_a_truncated_video_file_is_refused_before_the_weights_load(tmp_path, capsys):
    whole = write_clip(tmp_path / "whole.mp4", options={"movflags": "faststart"})
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    out = tmp_path / "out"
    rc = main(["track", "--frames", str(clip), "--mask", str(_prompt_png(tmp_path / "p.png")),
               "--output_dir", str(out), *SMALL])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert re.search(r"clip\.mp4: frame \d+ of 24 cannot be read: .*\(is the file truncated\?\)", err), err
    assert "random weights" not in err and not out.exists()


def test_an_absent_capture_device_is_named(tmp_path, capsys):
    rc = main(["track", "--frames", "/dev/video99", "--mask", str(_prompt_png(tmp_path / "p.png")),
               "--output_dir", str(tmp_path / "out"), *SMALL])  # fmt: skip
    assert rc == 2 and "/dev/video99: not a readable video stream" in capsys.readouterr().err
