"""Clip augmentation: SAM 2's transforms applied alike to frames and masks, each switchable to the
identity, the affine dropped when it would hide an object on frame 0, colour as torchvision's, and a
pure function of the generator."""

import dataclasses

import numpy as np
import pytest

from es3_jax.data import augment

T, H, W = 3, 60, 80
NONE = augment.AugmentSpec(
    hflip_prob=0.0,
    degrees=0.0,
    shear=0.0,
    brightness=0.0,
    contrast=0.0,
    saturation=0.0,
    grayscale_prob=0.0,
    frame_brightness=0.0,
    frame_contrast=0.0,
    frame_saturation=0.0,
)


def _clip(seed=0):
    """Frames painted with their masks' colours: object k (a box) in colour k over grey."""
    rng = np.random.default_rng(seed)
    frames = np.full((T, H, W, 3), 90, np.uint8)
    masks = np.zeros((T, 2, H, W), np.uint8)
    colours = np.array([[230, 40, 40], [40, 200, 60]], np.uint8)
    for t in range(T):
        for k in range(2):
            y, x = rng.integers(10, 30), rng.integers(10, 50)
            masks[t, k, y : y + 20, x : x + 22] = 1
            frames[t][masks[t, k] > 0] = colours[k]
        masks[t, 0] &= 1 - masks[t, 1]  # modal: object 1 hides what it covers of object 0
    return frames, masks, colours


def _draw(spec, seed=0):
    return augment.sample_augmentation(spec, np.random.default_rng(seed), T)


def test_identity_settings_change_nothing():
    frames, masks, _ = _clip()
    aug = _draw(NONE)
    out_frames, out_masks = augment.apply_geometry(aug, frames, masks)
    np.testing.assert_array_equal(out_frames, frames)
    np.testing.assert_array_equal(out_masks, masks)
    np.testing.assert_array_equal(augment.apply_colour(aug, frames), frames.astype(np.float32))


def test_flip_mirrors_frames_and_masks_exactly():
    frames, masks, _ = _clip()
    aug = _draw(dataclasses.replace(NONE, hflip_prob=1.0))
    out_frames, out_masks = augment.apply_geometry(aug, frames, masks)
    np.testing.assert_array_equal(out_frames, frames[:, :, ::-1])
    np.testing.assert_array_equal(out_masks, masks[..., ::-1])
    no_objects = augment.apply_geometry(aug, frames, masks[:, :0])  # a clip without objects
    np.testing.assert_array_equal(no_objects[0], frames[:, :, ::-1])
    assert no_objects[1].shape == (T, 0, H, W)


@pytest.mark.parametrize("seed", range(6))
def test_affine_and_crop_keep_masks_on_their_pixels(seed):
    frames, masks, colours = _clip(seed)
    spec = dataclasses.replace(NONE, degrees=25.0, shear=20.0, crop_scale=(0.5, 0.9), translate=0.05)
    aug = _draw(spec, seed)
    out_frames, out_masks = augment.apply_geometry(aug, frames, masks)
    assert out_frames.shape[:3] == out_masks.shape[:1] + out_masks.shape[2:]
    assert out_frames.shape[1] * out_frames.shape[2] < 0.95 * H * W  # cropped
    # Each pixel to its nearest colour among the objects', the grey and the fill: a bilinear boundary
    # pixel goes to the side it is more than half of, where a nearest-neighbour mask puts it too.
    palette = np.concatenate([colours, [[90, 90, 90], augment.FILL]]).astype(int)
    nearest = np.abs(out_frames[..., None, :].astype(int) - palette).sum(-1).argmin(-1)
    for t in range(T):
        for k in range(2):
            painted, m = nearest[t] == k, out_masks[t, k] > 0
            if m.sum() > 150:  # worst over 300 seeds: 0.943 (objects cut to a sliver are boundary)
                assert (m & painted).sum() / (m | painted).sum() > 0.92, (t, k)


def test_the_affine_is_dropped_when_it_would_hide_an_object_on_the_first_frame():
    frames, masks, _ = _clip()
    masks[0, 1] = 0
    masks[0, 1, :3, :3] = 1  # a corner object: a large shift takes it off the frame
    spec = dataclasses.replace(NONE, hflip_prob=1.0, translate=0.9)
    aug = _draw(spec, 1)
    assert max(abs(v) for v in aug.translate) > 0.3
    _, out_masks = augment.apply_geometry(aug, frames, masks)
    np.testing.assert_array_equal(out_masks, masks[..., ::-1])  # the flip stays, the affine goes


def test_a_crop_that_would_cut_an_object_off_the_first_frame_is_dropped_too():
    frames, masks, _ = _clip()
    masks[0, 1] = 0
    masks[0, 1, :3, :3] = 1
    spec = dataclasses.replace(NONE, crop_scale=(0.2, 0.2), degrees=10.0)
    dropped = 0
    for seed in range(20):
        aug = _draw(spec, seed)
        out_frames, out_masks = augment.apply_geometry(aug, frames, masks)
        assert out_masks[0].any(axis=(1, 2)).all()  # both objects still on frame 0
        if out_frames.shape[1:3] == (H, W):  # the crop went: no affine either
            np.testing.assert_array_equal(out_masks, masks)
            np.testing.assert_array_equal(out_frames, frames)
            dropped += 1
    assert dropped  # a fifth of the frame rarely holds the corner


def test_colour_follows_torchvision_formulas():
    frames, _, _ = _clip()
    aug = dataclasses.replace(
        _draw(NONE),
        clip_jitter=augment.Jitter(factors=(1.3, 1.0, 1.0), order=(0, 1, 2)),
        frame_jitters=tuple(augment.Jitter(factors=(1.0, 0.5, 1.0), order=(2, 1, 0)) for _ in range(T)),
    )
    out = augment.apply_colour(aug, frames)
    bright = np.clip(frames.astype(np.float32) * 1.3, 0, 255)
    gray_mean = (bright @ np.array([0.299, 0.587, 0.114], np.float32)).mean(axis=(1, 2))
    expect = np.clip((bright - gray_mean[:, None, None, None]) * 0.5 + gray_mean[:, None, None, None], 0, 255)
    np.testing.assert_allclose(out, expect, atol=1e-3)
    gray = augment.apply_colour(dataclasses.replace(_draw(NONE), grayscale=True), frames)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    np.testing.assert_array_equal(gray[..., 1], gray[..., 2])


def test_a_draw_is_a_pure_function_of_the_generator():
    spec = augment.AugmentSpec(crop_scale=(0.3, 1.0))
    assert _draw(spec, 5) == _draw(spec, 5)
    assert _draw(spec, 5) != _draw(spec, 6)
    draws = [_draw(spec, s) for s in range(400)]
    assert 0.4 < np.mean([d.flip for d in draws]) < 0.6  # SAM 2's p = 0.5
    assert max(abs(d.degrees) for d in draws) <= 25 and max(abs(d.shear) for d in draws) <= 20
    assert 0.01 < np.mean([d.grayscale for d in draws]) < 0.1  # p = 0.05
    assert all(0.9 <= d.clip_jitter.factors[0] <= 1.1 for d in draws)
