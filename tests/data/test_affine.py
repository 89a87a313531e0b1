"""Affine maps of frames and masks: exact on integer shifts and flips, bit-packed masks equal to one
resampling per mask, and frames and masks kept aligned."""

import numpy as np
from PIL import Image

from es3_jax.data import affine


def _masks(rng, n=11, h=40, w=56):
    return (rng.random((n, h, w)) > 0.6).astype(np.uint8)


def test_integer_shift_and_flip_are_exact():
    masks = _masks(np.random.default_rng(0))
    shifted = affine.warp_masks(masks, affine.affine_matrix(40, 56, translate=(5, -3)))
    np.testing.assert_array_equal(shifted[:, :-3, 5:], masks[:, 3:, :-5])
    assert not shifted[:, -3:].any() and not shifted[:, :, :5].any()  # 0 where the source has no pixel
    flipped = affine.warp_masks(masks, affine.affine_matrix(40, 56, flip=True))
    np.testing.assert_array_equal(flipped, masks[:, :, ::-1])
    frame = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        affine.warp_frame(frame, affine.affine_matrix(40, 56, flip=True), (0, 0, 0)), frame[:, ::-1]
    )


def test_bit_packed_masks_equal_one_resampling_per_mask():
    masks = _masks(np.random.default_rng(2))  # 11 masks: two groups of bit planes
    matrix = affine.affine_matrix(40, 56, degrees=17, shear=-8, scale=1.2, translate=(3.3, -2.1))
    inverse = np.linalg.inv(matrix)[:2].reshape(-1)
    one_by_one = np.stack(
        [
            np.asarray(
                Image.fromarray(m).transform(
                    (56, 40), Image.Transform.AFFINE, tuple(inverse), resample=Image.Resampling.NEAREST
                )
            )
            for m in masks
        ]
    )
    np.testing.assert_array_equal(affine.warp_masks(masks, matrix), one_by_one)


def test_a_mask_and_its_image_move_together():
    rng = np.random.default_rng(3)
    mask = np.zeros((120, 160), np.uint8)
    yy, xx = np.mgrid[:120, :160]
    mask[((yy - 55) / 30.0) ** 2 + ((xx - 70) / 45.0) ** 2 < 1] = 1
    for _ in range(5):
        matrix = affine.affine_matrix(
            120, 160, degrees=rng.uniform(-25, 25), shear=rng.uniform(-20, 20), scale=rng.uniform(0.8, 1.2)
        )
        warped = affine.warp_masks(mask[None], matrix)[0].astype(bool)
        painted = affine.warp_frame(np.repeat(mask[..., None] * 255, 3, -1), matrix, (0, 0, 0))[..., 0] >= 128
        assert (warped & painted).sum() / (warped | painted).sum() > 0.98


def test_the_map_composes_in_the_documented_order():
    m = affine.affine_matrix(100, 200, degrees=90, translate=(10, 0))
    # (100, 50) -> centre; (150, 50) is 50 px right of it: a quarter turn counter-clockwise on
    # screen puts it 50 px above, then 10 px right.
    np.testing.assert_allclose(m @ [150, 50, 1], [110, 0, 1], atol=1e-9)
    np.testing.assert_allclose(affine.affine_matrix(100, 200, flip=True) @ [0, 0, 1], [200, 0, 1])
