"""Frame folders: layouts, ordering, errors naming the file, and preprocessing equal to sam3's loader."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from es3_jax.data.frames import FrameError, list_frames, list_videos, load_frame_uint8, normalize

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures"
BEDROOM = FIXTURES / "bedroom_frames"


def _jpeg(path: Path, value: int = 0, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 7)).save(path)
    return path


def test_sav_layout_sorted_by_integer_stem(tmp_path):
    for stem in ("10", "2", "0", "100"):
        _jpeg(tmp_path / "sav_000002" / f"{stem}.jpg")
    _jpeg(tmp_path / "sav_000001" / "00004.jpg")
    (tmp_path / "sav_000001" / "notes.txt").write_text("not a frame")
    (tmp_path / "empty").mkdir()
    videos = list_videos(tmp_path)
    assert [v.name for v in videos] == ["sav_000001", "sav_000002"]
    assert videos[1].stems == ["0", "2", "10", "100"]
    assert videos[0].stems == ["00004"]


def test_non_integer_stems_sort_lexicographically(tmp_path):
    for stem in ("b", "a10", "a2"):
        _jpeg(tmp_path / f"{stem}.png")
    assert [p.stem for p in list_frames(tmp_path)] == ["a10", "a2", "b"]


def test_davis_layout(tmp_path):
    for seq in ("bear", "blackswan"):
        for i in range(3):
            _jpeg(tmp_path / "JPEGImages" / "480p" / seq / f"{i:05d}.jpg")
    (tmp_path / "Annotations" / "480p" / "bear").mkdir(parents=True)
    assert [v.name for v in list_videos(tmp_path)] == ["bear", "blackswan"]
    assert [v.name for v in list_videos(tmp_path / "JPEGImages" / "480p")] == ["bear", "blackswan"]


def test_single_folder_is_one_video():
    if not BEDROOM.is_dir():
        pytest.skip("fixtures absent")
    (video,) = list_videos(BEDROOM)
    assert video.name == "bedroom_frames" and len(video) == 32  # README.txt is not a frame
    assert video.stems[:3] == ["00000", "00001", "00002"] and video.stems[-1] == "00031"


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FrameError, match="frame folder not found"):
        list_frames(tmp_path / "nope")
    with pytest.raises(FrameError, match="no images"):
        list_frames(tmp_path)
    bad = tmp_path / "v" / "00001.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8 truncated jpeg")
    with pytest.raises(FrameError, match=r"frame unreadable: .*v/00001\.jpg"):
        load_frame_uint8(bad, 28)
    with pytest.raises(FrameError, match=r"frame missing: .*00002\.jpg"):
        load_frame_uint8(tmp_path / "v" / "00002.jpg", 28)
    _jpeg(tmp_path / "w" / "1.jpg")
    _jpeg(tmp_path / "w" / "1.png")
    with pytest.raises(FrameError, match="share the frame name"):
        list_frames(tmp_path / "w")


def test_normalize_numpy_and_jax_agree():
    x = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours = normalize(x, mean, std)

    np.testing.assert_allclose(np.asarray(normalize(jnp.asarray(x), mean, std)), ours, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours, (x / 255.0 - np.array(mean)) / np.array(std), rtol=1e-6, atol=1e-6)


def test_preprocessing_matches_sam3_image_folder_loader():
    """Resize and scaling exactly as sam3's `_load_img_as_tensor` (torchvision resize of a PIL image)."""
    if not BEDROOM.is_dir():
        pytest.skip("fixtures absent")
    pytest.importorskip("torch")
    io_utils = pytest.importorskip("sam3.model.io_utils")
    paths = list_frames(BEDROOM)[:2]
    for size in (224, 1008):
        ours = normalize(np.stack([load_frame_uint8(p, size)[0] for p in paths]), (0.5,) * 3, (0.5,) * 3)
        for i, path in enumerate(paths):
            ref, h, w = io_utils._load_img_as_tensor(str(path), size)
            assert (h, w) == (540, 960)
            # Normalised in float32 here (upstream stores float16).
            ref = ((ref - 0.5) / 0.5).permute(1, 2, 0).numpy()
            err = np.abs(ours[i] - ref).max()
            print(f"[parity] frame preprocessing {size}px vs sam3 io_utils: max abs error {err:.2e}")
            assert err <= 1e-6
