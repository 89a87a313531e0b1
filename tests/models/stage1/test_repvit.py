"""Parity of the RepViT stage-1 backbone with timm's RepViT (upstream's maths, upstream's names).

Weights are timm's, drawn at random (every BatchNorm affine and statistic too), renamed to
upstream's backbone keys (`timm_to_upstream`) and ported by `porting.stage1_checkpoint.port_backbone`,
as a stage-1 checkpoint would be.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("timm")

from es3_jax.models.stage1.repvit import VARIANTS, RepViT, se_channels
from es3_jax.params import abstract_shapes, bind
from tests import upstream
from tests.models.stage1.timm_repvit import (
    random_timm,
    timm_features,
    timm_to_upstream,
)

torch = upstream.torch

from porting.stage1_checkpoint import port_backbone  # noqa: E402

pytestmark = pytest.mark.parity


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """timm on one thread: on a busy machine torch's spinning worker threads cost more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ours_and_timm(kind: str, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """timm's final map and ours, both `[1, h, w, C]`, for one random model and image (the model's
    BatchNorm statistics measured on that image, see `random_timm`)."""
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    model = random_timm(kind, seed, calibration=x)
    ref = upstream.nchw_to_nhwc(timm_features(model, x))
    params = port_backbone(kind, timm_to_upstream(model.state_dict()))
    del model
    ours = bind(lambda: RepViT(kind, size, rngs=nnx.Rngs(0)), params)
    assert ours.out_channels == ref.shape[-1]
    out = jax.jit(lambda m, images: m(images))(ours, jnp.asarray(upstream.nchw_to_nhwc(x)))
    return np.asarray(out), ref


def test_repvit_m1_1_matches_timm_at_1008():
    kind = "repvit_m1_1"
    out, ref = ours_and_timm(kind, 1008, upstream.fresh_seed())
    assert out.shape == ref.shape == (1, 32, 32, 512) and out.dtype == np.float32
    assert np.isfinite(ref).all() and 0.1 < np.abs(ref).max() < 100
    upstream.report(f"{kind} 1008 px, final map", out, ref, 1e-4)


# The main variant's blocks at other widths and depths: their layout is checked in every run
# (test_stage1_trunk), their numerics with `make test-slow`.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "size", "grid"),
    [
        # A side that is no multiple of 32: 100 -> 50, 25, 13, 7, 4, as torch's padded convs give it.
        ("repvit_m0_9", 100, 4),
        ("repvit_m2_3", 128, 4),
    ],
)
def test_other_variants_match_timm(kind, size, grid):
    out, ref = ours_and_timm(kind, size, upstream.fresh_seed())
    assert out.shape == ref.shape == (1, grid, grid, VARIANTS[kind].widths[-1])
    assert np.isfinite(ref).all() and 0.1 < np.abs(ref).max() < 100
    upstream.report(f"{kind} {size} px, final map", out, ref, 1e-4)


@functools.cache
def _shapes(kind: str) -> dict[str, tuple[int, ...]]:
    # Building the module, even abstractly, is most of these tests' time (M2.3: seconds).
    return abstract_shapes(lambda: RepViT(kind, 1008, rngs=nnx.Rngs(0)))


def test_upstream_layout():
    """Upstream's flat `features` list: stem Sequential at 0, stride-2 blocks at 4, 8, 22 for M1.1
    (`token_mixer.{0,2}`, no squeeze-excite), squeeze-excite alternating from each stage's first
    stride-1 block but never on the block before a downsample."""
    shapes = _shapes("repvit_m1_1")
    assert shapes["features.0.0.c.kernel"] == (3, 3, 3, 32)
    assert shapes["features.0.2.c.kernel"] == (3, 3, 32, 64)
    assert {int(p.split(".")[1]) for p in shapes} == set(range(25))
    downsampling = {int(p.split(".")[1]) for p in shapes if ".token_mixer.2." in p}
    assert downsampling == {4, 8, 22}
    assert shapes["features.22.token_mixer.0.c.kernel"] == (3, 3, 1, 256)
    assert shapes["features.22.token_mixer.2.c.kernel"] == (1, 1, 256, 512)
    assert shapes["features.5.token_mixer.0.conv1.kernel"] == (1, 1, 1, 128)
    with_se = sorted({int(p.split(".")[1]) for p in shapes if ".token_mixer.1.fc1." in p})
    assert with_se == [1, 5, 9, 11, 13, 15, 17, 19, 23]
    assert shapes["features.23.token_mixer.1.fc1.kernel"] == (1, 1, 512, se_channels(512))
    assert [se_channels(c) for c in (48, 64, 80, 96, 160, 192)] == [16, 16, 24, 24, 40, 48]
    stride2 = {"repvit_m0_9": [4, 8, 24], "repvit_m1_1": [4, 8, 22], "repvit_m2_3": [8, 16, 52]}
    for kind, indices in stride2.items():
        assert [i for i, (_, _, stride, _) in enumerate(VARIANTS[kind].layers(), 1) if stride == 2] == indices


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown RepViT kind"):
        RepViT("repvit_m1_5", 224, rngs=nnx.Rngs(0))
