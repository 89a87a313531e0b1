"""`es3 track` end to end on the real-frame fixtures, with the tiny random-weight config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from es3_jax import config as config_lib
from es3_jax.cli import main
from es3_jax.data.masks import read_palette_png, write_palette_png
from es3_jax.predictor.frame_sources import FrameSourceError, open_video

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


def test_track_judo_objects_join_later(tmp_path, capsys):
    root = _needs(FIXTURES / "cutie_examples")
    out = tmp_path / "out"
    rc = main(["track", "--frames", str(root / "images" / "judo"), "--mask", str(root / "masks" / "judo"),
               "--output_dir", str(out), "--config", TINY, "MODEL.TEACHER.IMAGE_SIZE", "112",
               "MODEL.TRUNK.PRETRAIN_IMAGE_SIZE", "56"])  # fmt: skip
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
