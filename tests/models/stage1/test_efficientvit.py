"""Parity of the stage-1 EfficientViT trunk (MIT, B series) with timm's, random weights, and the
parameter tree's mirror of upstream's (efficientsam3) state-dict names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from es3_jax.models.stage1.efficientvit import VARIANTS, EfficientViT
from es3_jax.params import bind
from tests import upstream

pytest.importorskip("timm")
from porting.stage1_checkpoint import port_backbone
from tests.models.stage1.timm_efficientvit import (
    random_timm,
    timm_features,
    timm_to_upstream,
)

torch = upstream.torch

pytestmark = pytest.mark.parity

MAIN = "efficientvit_b1"


def _run_parity(kind: str, size: int, tol: float) -> None:
    seed = upstream.fresh_seed()
    model = random_timm(kind, seed)
    params = port_backbone(kind, timm_to_upstream(model.state_dict()))
    ours = bind(lambda: EfficientViT(kind, size, rngs=nnx.Rngs(0)), params)
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    ref = upstream.nchw_to_nhwc(timm_features(model, images))
    # One compiled program: op-by-op dispatch of ~400 small ops costs more than compiling them.
    out = np.asarray(jax.jit(lambda m, x: m(x))(ours, jnp.asarray(upstream.nchw_to_nhwc(images))))
    side = -(-size // 32)
    assert out.shape == ref.shape == (1, side, side, ours.out_channels)
    assert np.isfinite(ref).all() and 1e-2 < np.abs(ref).max() < 1e3, "reference activations out of range"
    upstream.report(f"{kind} {size}px stage_final", out, ref, tol)


def test_main_variant_matches_timm_at_1008():
    _run_parity(MAIN, 1008, 1e-4)


# The main variant's blocks at other widths and depths: their layout is checked in every run
# (test_stage1_trunk), their numerics with `make test-slow`.
@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(set(VARIANTS) - {MAIN}))
def test_other_variants_match_timm_small(kind):
    _run_parity(kind, 224, 1e-4)


def test_rejects_unknown_kind():
    with pytest.raises(ValueError, match="efficientvit_b9"):
        EfficientViT("efficientvit_b9", 224, rngs=nnx.Rngs(0))
