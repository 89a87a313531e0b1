"""Parity of the memory encoder and `SAM3Tracker.encode_memory` with upstream sam3's tracker.

Reduced grids (16×16 features) need the upstream mask down-sampler to interpolate to
16·16 = 256 px instead of its fixed 1152 px; ours derives that size from the feature grid.
"""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from es3_jax.config import Config
from es3_jax.models.tracker import SAM3Tracker, build_tracker
from tests import upstream

torch = upstream.torch

pytestmark = pytest.mark.parity

GRID = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(seed, upstream tracker, our tracker bound from its sam3.pt, the ported parameters)."""
    seed, tracker, _, params = upstream.ported_reference(tmp_path_factory.mktemp("memenc"))
    return seed, tracker, build_tracker(Config().MODEL.TEACHER, params), params


def _set_interpol_size(tracker, size: int) -> None:
    tracker.maskmem_backbone.mask_downsampler.interpol_size = [size, size]


def _inputs(seed: int, batch: int, grid: int, mask_px: int, mask_scale: float = 4.0):
    g = torch.Generator().manual_seed(seed + mask_px)
    pix = torch.randn(batch, 256, grid, grid, generator=g)
    mask = torch.randn(batch, 1, mask_px, mask_px, generator=g) * mask_scale
    return pix, mask


def _check_memory_encoder(tracker, ours, pix, mask, name: str, skip_mask_sigmoid: bool = True) -> None:
    with torch.no_grad():
        ref = tracker.maskmem_backbone(pix, mask, skip_mask_sigmoid=skip_mask_sigmoid)
    feat, pos = ours(
        jnp.asarray(upstream.nchw_to_nhwc(pix)),
        jnp.asarray(upstream.nchw_to_nhwc(mask)),
        skip_mask_sigmoid=skip_mask_sigmoid,
    )
    upstream.report(f"{name} features", feat, upstream.nchw_to_nhwc(ref["vision_features"]), 1e-5)
    upstream.report(f"{name} pos", pos, upstream.nchw_to_nhwc(ref["vision_pos_enc"][0]), 1e-5)


@pytest.mark.parametrize(
    ("mask_px", "skip_mask_sigmoid"),
    [(16 * GRID, True), (200, True), (320, True), (16 * GRID, False)],
    ids=["no-resize", "upsample", "antialiased-downsample", "with-sigmoid"],
)
def test_memory_encoder_matches_upstream(setup, mask_px, skip_mask_sigmoid):
    seed, tracker, ours, _ = setup
    _set_interpol_size(tracker, 16 * GRID)
    # Masks as the tracker feeds them (20·m − 10 of a probability) or raw logits for the sigmoid path.
    pix, mask = _inputs(seed, 2, GRID, mask_px)
    if skip_mask_sigmoid:
        mask = torch.sigmoid(mask) * 20 - 10
    name = f"memory encoder {GRID}² grid, {mask_px}² mask, sigmoid={not skip_mask_sigmoid}"
    _check_memory_encoder(tracker, ours.memory_encoder, pix, mask, name, skip_mask_sigmoid)


def test_memory_encoder_full_size(setup):
    seed, tracker, ours, _ = setup
    _set_interpol_size(tracker, 1152)
    pix, mask = _inputs(seed, 1, 72, 1008)
    mask = torch.sigmoid(mask) * 20 - 10
    start = time.perf_counter()
    _check_memory_encoder(tracker, ours.memory_encoder, pix, mask, "memory encoder 72² grid, 1008² mask")
    print(f"[timing] full-size memory encoder parity case: {time.perf_counter() - start:.1f} s")


@pytest.mark.parametrize("non_overlap", [False, True], ids=["sam3", "non-overlap"])
@pytest.mark.parametrize("is_mask_from_pts", [False, True], ids=["sigmoid", "from-points"])
def test_encode_memory_matches_upstream(setup, is_mask_from_pts, non_overlap):
    seed, tracker, ours, params = setup
    _set_interpol_size(tracker, 16 * GRID)
    tracker.non_overlap_masks_for_mem_enc = non_overlap
    # 200 px: the upstream path also resizes (1008 -> 1152 at full size).
    pix, masks = _inputs(seed, 2, GRID, 200)
    scores = torch.tensor([[2.5], [-1.5]])  # object 0 present, object 1 absent
    vision_feats = [pix.flatten(2).permute(2, 0, 1)]  # (HW, B, C), as upstream's current_vision_feats
    try:
        with torch.no_grad():
            ref_feat, ref_pos = tracker._encode_new_memory(
                image=None,
                current_vision_feats=vision_feats,
                feat_sizes=[(GRID, GRID)],
                pred_masks_high_res=masks,
                object_score_logits=scores,
                is_mask_from_pts=is_mask_from_pts,
            )
    finally:
        tracker.non_overlap_masks_for_mem_enc = False
    inputs = (
        jnp.asarray(upstream.nchw_to_nhwc(pix)),
        jnp.asarray(upstream.nchw_to_nhwc(masks)),
        jnp.asarray(scores.numpy()),
    )
    feat, pos = ours.encode_memory(*inputs, is_mask_from_pts=is_mask_from_pts, non_overlap_masks=non_overlap)
    name = f"encode_memory from_pts={is_mask_from_pts} non_overlap={non_overlap}"
    upstream.report(f"{name} features", feat, upstream.nchw_to_nhwc(ref_feat), 1e-5)
    upstream.report(f"{name} pos", pos, upstream.nchw_to_nhwc(ref_pos[0]), 1e-5)
    # The no-object embedding reaches the absent object only, unchanged at every pixel.
    no_obj = params["no_obj_embed_spatial"]
    zeroed = build_tracker(Config().MODEL.TEACHER, {**params, "no_obj_embed_spatial": np.zeros_like(no_obj)})
    without, _ = zeroed.encode_memory(
        *inputs, is_mask_from_pts=is_mask_from_pts, non_overlap_masks=non_overlap
    )
    np.testing.assert_array_equal(feat[0], without[0])
    np.testing.assert_allclose(feat[1] - without[1], np.broadcast_to(no_obj, feat[1].shape), atol=1e-6)


def test_encode_memory_jits_in_bfloat16():
    small = dataclasses.replace(Config().MODEL.TEACHER, IMAGE_SIZE=112)
    tracker = SAM3Tracker(small, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    step = nnx.jit(lambda t, *a, **k: t.encode_memory(*a, **k), static_argnames=("is_mask_from_pts",))
    feat, pos = step(
        tracker,
        jnp.ones((2, 8, 8, 256)),
        jnp.ones((2, 100, 100, 1)),
        jnp.array([[1.0], [-1.0]]),
        is_mask_from_pts=False,
    )
    assert feat.shape == pos.shape == (2, 8, 8, 64)
    assert feat.dtype == pos.dtype == jnp.bfloat16
    assert bool(jnp.isfinite(feat.astype(jnp.float32)).all())
