"""Parity of the tracker neck (`sam2_convs` levels 0-2 and their sine PEs) with upstream sam3."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx

from es3_jax.models.neck import NeckLevel, TrackerNeck
from es3_jax.params import bind
from tests import upstream

torch = upstream.torch

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    seed, _, neck, params = upstream.ported_reference(tmp_path_factory.mktemp("neck"))
    ours = bind(lambda: TrackerNeck(1024, 256, rngs=nnx.Rngs(0)), params["neck"])
    return seed, neck, ours


def test_neck_levels_and_pos_match_upstream(setup):
    seed, neck, ours = setup
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1024, 16, 16, generator=g)
    with torch.no_grad():
        refs = [neck.sam2_convs[i](x) for i in range(3)]
        ref_pos = [neck.position_encoding(r) for r in refs]
    features, pos = ours(jnp.asarray(upstream.nchw_to_nhwc(x)))
    assert len(features) == len(pos) == 3
    for i, scale in enumerate((4, 2, 1)):
        assert features[i].shape == (2, 16 * scale, 16 * scale, 256)
        upstream.report(f"neck level {i} features", features[i], upstream.nchw_to_nhwc(refs[i]), 1e-5)
        upstream.report(f"neck level {i} pos", pos[i], upstream.nchw_to_nhwc(ref_pos[i]), 1e-5)


def test_neck_rejects_unknown_scale():
    with pytest.raises(ValueError, match="scale"):
        NeckLevel(8, 4, 3, rngs=nnx.Rngs(0))
