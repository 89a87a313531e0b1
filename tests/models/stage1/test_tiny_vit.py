"""Parity of the TinyViT stage-1 backbone with timm's TinyViT (upstream's maths, upstream's names).

Weights are timm's, drawn at random, renamed to upstream's backbone keys (`timm_to_upstream`) and
ported by `porting.stage1_checkpoint.port_backbone`, as a stage-1 checkpoint would be.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from es3_jax.models.stage1.tiny_vit import VARIANTS, TinyViT, attention_bias_idxs, layer_resolutions
from es3_jax.params import abstract_shapes, bind
from porting.stage1_checkpoint import port_backbone
from tests import upstream
from tests.models.stage1.timm_tiny_vit import (
    build_timm,
    random_timm,
    timm_features,
    timm_to_upstream,
)

torch = upstream.torch
pytest.importorskip("timm")

pytestmark = pytest.mark.parity


def ours_and_timm(kind: str, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """timm's final map and ours, both `[1, h, w, C]`, for one random model and image."""
    model = random_timm(kind, seed)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = upstream.nchw_to_nhwc(timm_features(model, x))
    params = port_backbone(kind, timm_to_upstream(model.state_dict()))
    del model
    ours = bind(lambda: TinyViT(kind, size, rngs=nnx.Rngs(0)), params)
    out = jax.jit(lambda m, images: m(images))(ours, jnp.asarray(upstream.nchw_to_nhwc(x)))
    return np.asarray(out), ref


def test_tiny_vit_11m_matches_timm_at_1008():
    """Grids 252, 126, 63, 32: windows of 14 on 63 and of 7 on 32 are zero-padded (to 70 and 35)."""
    kind = "tiny_vit_11m"
    out, ref = ours_and_timm(kind, 1008, upstream.fresh_seed())
    assert out.shape == ref.shape == (1, 32, 32, 448) and out.dtype == np.float32
    assert np.isfinite(ref).all() and 0.1 < np.abs(ref).max() < 100
    upstream.report(f"{kind} 1008 px, final map", out, ref, 1e-4)


# The main variant's blocks at other widths and depths: their layout is checked in every run
# (test_stage1_trunk), their numerics with `make test-slow`.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tiny_vit_5m", "tiny_vit_21m"])
def test_other_variants_match_timm_at_256(kind):
    """Grids 64, 32, 16, 8: every attention layer pads (32 -> 35, 16 -> 28, 8 -> 14)."""
    out, ref = ours_and_timm(kind, 256, upstream.fresh_seed())
    assert out.shape == ref.shape == (1, 8, 8, VARIANTS[kind].embed_dims[-1])
    upstream.report(f"{kind} 256 px, final map", out, ref, 1e-4)


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_upstream_layout(kind):
    """The downsample closes layers 0-2 (none after the last), attention biases are [heads, window²]."""
    shapes = abstract_shapes(lambda: TinyViT(kind, 1008, rngs=nnx.Rngs(0)))
    assert "layers.0.downsample.conv2.c.kernel" in shapes
    assert not any(k.startswith("layers.3.downsample") for k in shapes)
    assert shapes["layers.2.blocks.0.attn.attention_biases"] == (VARIANTS[kind].num_heads[2], 14 * 14)


def test_attention_bias_index_matches_timm():
    """The non-persistent index table, rebuilt in numpy, is timm's (= upstream's) buffer."""
    model = build_timm("tiny_vit_5m")
    for stage, ws in ((1, 7), (2, 14)):
        buffer = model.stages[stage].blocks[0].attn.attention_bias_idxs.numpy()
        np.testing.assert_array_equal(attention_bias_idxs(ws), buffer)


def test_geometry():
    """Upstream's fixed grids at 1008 px, and the sizes upstream's fixed grids cannot run."""
    assert layer_resolutions(1008) == (252, 126, 63, 32)
    model = nnx.eval_shape(lambda: TinyViT("tiny_vit_11m", 1008, rngs=nnx.Rngs(0)))
    assert model.feature_size == 32 and model.out_channels == 448
    with pytest.raises(ValueError, match="layer grids"):
        TinyViT("tiny_vit_5m", 1009, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown TinyViT kind"):
        TinyViT("tiny_vit_7m", 224, rngs=nnx.Rngs(0))
