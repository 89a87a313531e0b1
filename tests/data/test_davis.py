"""DAVIS 2017 and SA-V val layouts: sequence lists, frames, and the semi-supervised prompts."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from es3_jax.data import davis
from es3_jax.data.masks import write_palette_png

CUTIE = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "cutie_examples"


@pytest.fixture
def davis_root(tmp_path):
    """A DAVIS root linking the cutie judo and bike examples (frames + palette masks)."""
    if not CUTIE.is_dir():
        pytest.skip(f"fixture missing: {CUTIE}")
    for seq in ("judo", "bike"):
        for src, dst in (("images", "JPEGImages"), ("masks", "Annotations")):
            (tmp_path / dst / "480p").mkdir(parents=True, exist_ok=True)
            (tmp_path / dst / "480p" / seq).symlink_to((CUTIE / src / seq).resolve())
    return tmp_path


def test_davis_sequences_from_folders_or_split_file(davis_root):
    assert davis.list_sequences("davis", davis_root) == ["bike", "judo"]
    (davis_root / "ImageSets" / "2017").mkdir(parents=True)
    (davis_root / "ImageSets" / "2017" / "val.txt").write_text("judo\n\n")
    videos = davis.open_dataset("davis", davis_root)
    assert [v.name for v in videos] == ["judo"]
    judo = videos[0]
    assert judo.layout == "davis" and len(judo) == 16
    assert judo.frame_names == [f"{i:05d}" for i in range(16)]
    assert [v.name for v in davis.open_dataset("davis", davis_root, sequences=["bike"])] == ["bike"]


def test_davis_prompts_are_the_first_frame_objects(davis_root):
    judo, bike = (davis.open_dataset("davis", davis_root, sequences=[s])[0] for s in ("judo", "bike"))
    # judo's objects 2..4 first appear on later frames: the DAVIS protocol prompts frame 0 only.
    prompts = judo.prompts()
    assert [(p.frame_idx, p.obj_id) for p in prompts] == [(0, 1)]
    assert prompts[0].mask.shape == (480, 854) and prompts[0].mask.dtype == bool and prompts[0].mask.any()
    assert [(p.frame_idx, p.obj_id) for p in bike.prompts()] == [(0, 1), (0, 2)]


def test_void_is_not_an_object(tmp_path):
    ids = np.zeros((6, 8), np.uint8)
    ids[1:3, 1:3] = 3
    ids[4:, :] = 255
    path = write_palette_png(tmp_path / "00000.png", ids)
    objects = davis.read_davis_objects(path)
    assert list(objects) == [3]
    np.testing.assert_array_equal(objects[3], ids == 3)


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
    (root / "sav_val.txt").write_text("sav_000001\n")
    (video,) = davis.open_dataset("sav", root)
    assert video.layout == "sav" and len(video) == 12
    prompts = video.prompts()
    assert [(p.frame_idx, p.obj_id) for p in prompts] == [(0, 0), (8, 1)]  # object 2 is never visible
    assert prompts[1].mask[2:6, 11:16].all() and prompts[1].mask.sum() == 20


def test_layout_errors_name_the_path(tmp_path):
    with pytest.raises(davis.DatasetError, match="JPEGImages_24fps not found"):
        davis.open_dataset("sav", tmp_path)
    root = _sav_root(tmp_path / "sav")
    with pytest.raises(davis.DatasetError, match="nope"):
        davis.open_dataset("sav", root, sequences=["nope"])
    with pytest.raises(davis.DatasetError, match="unknown dataset"):
        davis.open_dataset("ytvos", root)
