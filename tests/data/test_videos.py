"""The shared records' helpers: numbered JPEG frames and split lists."""

from pathlib import Path

import pytest
from PIL import Image

from es3_jax.data import videos
from es3_jax.data.frames import FrameError


def test_numbered_frame_stems_keep_numbered_jpegs_in_frame_order(tmp_path):
    image = Image.new("RGB", (4, 3))
    for name in ("10.jpg", "2.JPEG", "00001.jpg", "thumb.jpg", "00003.png"):
        image.save(tmp_path / name)
    assert videos.numbered_frame_stems(tmp_path) == ["00001", "2", "10"]
    with pytest.raises(FrameError, match="not found"):
        videos.numbered_frame_stems(tmp_path / "missing")


def test_split_sequences_from_the_file_else_the_folders(tmp_path: Path):
    for name in ("b", "a", ".hidden"):
        (tmp_path / "ann" / name).mkdir(parents=True)
    (tmp_path / "ann" / "notes.txt").write_text("")
    assert videos.split_sequences(tmp_path / "val.txt", tmp_path / "ann") == ["a", "b"]
    (tmp_path / "val.txt").write_text("b\n\n c \n")
    assert videos.split_sequences(tmp_path / "val.txt", tmp_path / "ann") == ["b", "c"]
