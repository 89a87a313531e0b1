from pathlib import Path

import numpy as np
import pytest

from es3_jax.data.masks import (
    DAVIS_PALETTE,
    MaskFileError,
    logits_to_ids,
    read_binary_png,
    read_palette_png,
    write_palette_png,
)

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures"


def test_davis_palette_first_colours():
    assert DAVIS_PALETTE[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert len({tuple(c) for c in DAVIS_PALETTE}) == 256


def test_round_trip(tmp_path):
    ids = np.random.default_rng(0).integers(0, 5, (7, 9)).astype(np.uint8)
    path = write_palette_png(tmp_path / "sub" / "m.png", ids)
    np.testing.assert_array_equal(read_palette_png(path), ids)
    np.testing.assert_array_equal(read_binary_png(path), ids > 0)


def test_bad_inputs(tmp_path):
    with pytest.raises(MaskFileError, match="not found"):
        read_palette_png(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(MaskFileError, match=r"junk\.png"):
        read_palette_png(tmp_path / "junk.png")
    with pytest.raises(MaskFileError, match=r"\[H, W\]"):
        write_palette_png(tmp_path / "x.png", np.zeros((2, 2, 2)))


def test_logits_to_ids():
    logits = np.array(
        [
            [[5.0, 1.0, -1.0, 2.0]],
            [[4.0, 3.0, -2.0, 2.0]],
        ]
    )
    # Highest positive logit wins; a tie goes to the earlier object; no positive logit is background.
    np.testing.assert_array_equal(logits_to_ids(logits, [3, 7]), [[3, 7, 0, 3]])
    assert logits_to_ids(logits, [3, 255]).dtype == np.uint8
    empty = logits_to_ids(np.zeros((0, 2, 3), np.float32), [])
    assert empty.shape == (2, 3) and empty.dtype == np.uint8 and not empty.any()
    with pytest.raises(ValueError, match=r"1\.\.255"):
        logits_to_ids(logits, [3, 256])
    with pytest.raises(ValueError, match="2 mask logits"):
        logits_to_ids(logits, [3])


def test_cutie_fixture_masks():
    masks = FIXTURES / "cutie_examples" / "masks" / "judo"
    if not masks.is_dir():
        pytest.skip("fixtures absent")
    first = read_palette_png(masks / "00000.png")
    narrow = read_palette_png(masks / "00005.png")
    assert first.shape == (480, 854) and set(np.unique(first)) == {0, 1}
    assert narrow.shape == (480, 853) and set(np.unique(narrow)) == {0, 2}
