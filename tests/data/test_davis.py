"""DAVIS 2017: sequence lists, frames, the semi-supervised prompts, and a split indexed for training."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from es3_jax.data import datasets, davis
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
    assert davis.list_sequences(davis_root) == ["bike", "judo"]
    (davis_root / "ImageSets" / "2017").mkdir(parents=True)
    (davis_root / "ImageSets" / "2017" / "val.txt").write_text("judo\n\n")
    videos = datasets.open_dataset("davis", davis_root)
    assert [v.name for v in videos] == ["judo"]
    judo = videos[0]
    assert judo.layout == "davis" and len(judo) == 16
    assert judo.frame_names == [f"{i:05d}" for i in range(16)]
    assert [v.name for v in datasets.open_dataset("davis", davis_root, sequences=["bike"])] == ["bike"]


def test_davis_prompts_are_the_first_frame_objects(davis_root):
    judo, bike = (datasets.open_dataset("davis", davis_root, sequences=[s])[0] for s in ("judo", "bike"))
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


def _write_frames(folder: Path, numbers, size):
    folder.mkdir(parents=True)
    img = Image.new("RGB", (size[1], size[0]))
    for n in numbers:
        img.save(folder / f"{n:05d}.jpg")


def test_davis_training_source(tmp_path):
    """DAVIS palette PNGs: ids are objects, 255 is void; every frame is annotated."""
    frames = tmp_path / "JPEGImages" / "480p" / "seq"
    anns = tmp_path / "Annotations" / "480p" / "seq"
    _write_frames(frames, range(6), (12, 16))
    anns.mkdir(parents=True)
    for t in range(6):
        ids = np.zeros((12, 16), np.uint8)
        ids[t : t + 3, 2:6] = 1
        ids[0, :] = 255
        if t >= 3:
            ids[8:11, 10:14] = 3  # object 3 appears on frame 3
        write_palette_png(anns / f"{t:05d}.png", ids)
    entries, problems = davis.scan_davis(tmp_path, "train")
    assert not problems and len(entries) == 1
    e = entries[0]
    assert e.objects == (1, 3) and e.source == "davis" and (e.height, e.width) == (12, 16)
    np.testing.assert_array_equal(e.visible[:, 1], [0, 0, 0, 1, 1, 1])
    masks = davis.load_masks(e, [4, 1], [1, 0])
    assert masks.shape == (2, 2, 12, 16) and masks[0, 0].sum() == 12 and masks[1, 0].sum() == 0
    assert masks[1, 1, 1:4, 2:6].all() and masks[1, 1].sum() == 12
