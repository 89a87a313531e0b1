"""SA-1B pseudo-videos: the masks move with the image, frame 0 is the image, the motion is smooth and
within its ranges, and the clip is a pure function of its generator."""

import numpy as np
import pytest

from es3_jax.data import affine, pseudo_video, synthetic

H, W, T = 480, 640, 8
STYLE = synthetic.Style(textured=False, min_area=0.08, max_area=0.24)


@pytest.fixture(scope="module")
def still():
    """A flat-colour SA-1B-style image and its objects' masks [O, H, W]."""
    made = synthetic.make_image(0, 3, height=H, width=W, style=STYLE)
    objects = [i for i, kind in enumerate(made.kinds) if kind == "object"]
    return made.image, made.masks[objects].astype(np.uint8)


@pytest.mark.parametrize("seed", range(3))
def test_masks_move_with_their_pixels(still, seed):
    """Per frame and object: IoU of the moved mask against the object segmented from the moved
    image by its colour, over pixels mapped from at least 2 px inside the source."""
    image, masks = still
    colours = np.array([np.median(image[m > 0], axis=0) for m in masks]).astype(int)
    background = image[~masks.any(axis=0)].astype(int)
    # A bilinear pixel is the object's when it is nearer its colour than half way to the background.
    reach = [max(np.abs(background - c).sum(-1).min() / 2, 30) for c in colours]
    spec = pseudo_video.MotionSpec(degrees=15, shear=8, scale=(0.8, 1.25), translate=0.12)
    motion = pseudo_video.sample_motion(spec, np.random.default_rng(seed), T, H, W)
    frames, moved = pseudo_video.make_clip(image, masks, motion)
    interior = np.zeros((1, H, W), np.uint8)
    interior[:, 2:-2, 2:-2] = 1
    worst = 1.0
    for t in range(T):
        away = affine.warp_masks(interior, motion[t])[0] > 0
        distance = np.abs(frames[t][..., None, :].astype(int) - colours).sum(-1)
        for k in range(len(masks)):
            painted = (distance.argmin(-1) == k) & (distance[..., k] < reach[k]) & away
            m = (moved[t, k] > 0) & away
            worst = min(worst, (m & painted).sum() / (m | painted).sum())
    assert worst >= 0.99, worst


def test_frame_zero_is_the_image_and_the_clip_is_pure(still):
    image, masks = still
    spec = pseudo_video.MotionSpec()
    motion = pseudo_video.sample_motion(spec, np.random.default_rng(4), T, H, W)
    frames, moved = pseudo_video.make_clip(image, masks, motion)
    np.testing.assert_array_equal(frames[0], image)
    np.testing.assert_array_equal(moved[0], masks)
    again = pseudo_video.sample_motion(spec, np.random.default_rng(4), T, H, W)
    np.testing.assert_array_equal(motion, again)
    assert not np.allclose(motion, pseudo_video.sample_motion(spec, np.random.default_rng(5), T, H, W))


def test_the_motion_is_smooth_and_within_its_ranges():
    spec = pseudo_video.MotionSpec(degrees=10, shear=5, scale=(0.85, 1.15), translate=0.1)
    for seed in range(20):
        motion = pseudo_video.sample_motion(spec, np.random.default_rng(seed), T, H, W)
        centre = motion @ [W / 2, H / 2, 1]
        shift = np.linalg.norm(centre[:, :2] - [W / 2, H / 2], axis=1)
        assert shift[-1] <= np.hypot(0.1 * W, 0.1 * H) + 1e-6
        assert (np.diff(shift) >= -1e-9).all()  # the centre moves one way, no jitter
        steps = np.diff(shift)
        assert steps[0] < steps[T // 2 - 1] and steps[-1] < steps[T // 2 - 1]  # eases in and out
        linear = motion[:, :2, :2]
        det = np.linalg.det(linear)  # scale^2: shear and rotation keep the area
        assert (det >= 0.85**2 - 1e-9).all() and (det <= 1.15**2 + 1e-9).all()
