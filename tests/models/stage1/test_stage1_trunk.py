"""The stage-1 trunk around a backbone: its head against PyTorch, and the kinds the config names."""

from __future__ import annotations

import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from es3_jax import config
from es3_jax.config import STAGE1_TRUNK_KINDS
from es3_jax.models.stage1.stage1_trunk import FAMILIES, Stage1Trunk, family_of
from es3_jax.models.trunk import trunk_from_config
from es3_jax.params import abstract_shapes, flatten, param_dict
from tests import upstream

torch = upstream.torch

from porting.stage1_checkpoint import STAGE1_PREFIX, TIMM_NAMES, stage1_table  # noqa: E402
from tests.models.stage1 import timm_efficientvit, timm_repvit, timm_tiny_vit  # noqa: E402
from tests.models.stage1.reference_head import random_head  # noqa: E402

TIMM_HELPERS = {"repvit": timm_repvit, "tiny_vit": timm_tiny_vit, "efficientvit": timm_efficientvit}

pytestmark = pytest.mark.parity


def test_head_matches_pytorch():
    """1×1 conv (no bias), BatchNorm from running statistics, exact GELU, 3×3 conv, then bilinear
    32×32 -> 72×72 with half-pixel centres: upstream's `ImageStudentEncoder` after its backbone."""
    seed = upstream.fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    kind, out_dim = "efficientvit_b0", 96
    trunk = Stage1Trunk(kind, 64, 72, out_dim, rngs=nnx.Rngs(0))
    channels = trunk.backbone.out_channels
    head = random_head(channels, out_dim, seed)
    with torch.no_grad():
        features = torch.randn(2, channels, 32, 32, generator=gen)
        ref = torch.nn.functional.interpolate(
            head(features), size=(72, 72), mode="bilinear", align_corners=False
        )
    # The head's tensors into the trunk through the production key table.
    table = stage1_table(kind, out_dim)
    state = nnx.state(trunk, nnx.Param)
    for key, value in head.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        path, transform = table.to_jax(f"{STAGE1_PREFIX}head.{key}")
        node = state
        for part in path.removeprefix("trunk.").split("."):
            node = node[int(part) if part.isdigit() else part]
        node.set_value(jnp.asarray(transform.to_jax(value.numpy())))
    nnx.update(trunk, state)
    ours = trunk.project(jnp.asarray(upstream.nchw_to_nhwc(features)))
    upstream.report("stage-1 head + resize 32->72", np.asarray(ours), upstream.nchw_to_nhwc(ref), 1e-5)


def test_every_config_kind_has_a_family_and_builds_from_the_config():
    assert {family_of(kind) for kind in STAGE1_TRUNK_KINDS} == set(FAMILIES.values())
    for prefix, family in FAMILIES.items():
        variants = sys.modules[family.__module__].VARIANTS
        assert {k for k in STAGE1_TRUNK_KINDS if k.startswith(prefix + "_")} == set(variants), prefix
    cfg = config.load(None, ["MODEL.TRUNK.KIND", "repvit_m0_9", "MODEL.TEACHER.IMAGE_SIZE", "224"])
    trunk = nnx.eval_shape(lambda: trunk_from_config(cfg))
    assert isinstance(trunk, Stage1Trunk) and trunk.grid == 16
    assert flatten(param_dict(trunk))["head.3.kernel"].shape == (3, 3, 1024, 1024)
    with pytest.raises(ValueError, match="unknown stage-1 trunk kind 'resnet50'"):
        family_of("resnet50")


def _es3_path(key: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """The mirroring rule written out apart from `porting`: an upstream key and torch shape -> the
    es3 path and shape (convs and linears permuted, norms' leaves renamed)."""
    module, _, leaf = key.rpartition(".")
    if leaf == "weight" and len(shape) == 4:  # conv [O, I/g, kh, kw] -> [kh, kw, I/g, O]
        return f"{module}.kernel", (shape[2], shape[3], shape[1], shape[0])
    if leaf == "weight" and len(shape) == 2:  # linear [out, in] -> [in, out]
        return f"{module}.kernel", (shape[1], shape[0])
    leaf = {"weight": "scale", "running_mean": "mean", "running_var": "var"}.get(leaf, leaf)
    return f"{module}.{leaf}", shape


@pytest.mark.parametrize("kind", STAGE1_TRUNK_KINDS)
def test_parameter_paths_mirror_upstream_names(kind):
    """Every es3 parameter of a backbone is one of upstream's keys (timm's renamed to upstream's), and back."""
    helpers = next(h for prefix, h in TIMM_HELPERS.items() if kind.startswith(prefix + "_"))
    assert kind in TIMM_NAMES
    timm_model = helpers.build_timm(kind, device="meta")
    upstream_shapes = {
        k: tuple(v.shape)
        for k, v in helpers.timm_to_upstream(timm_model.state_dict()).items()
        if not k.endswith("num_batches_tracked")
    }
    expected = dict(_es3_path(k, s) for k, s in upstream_shapes.items())
    assert len(expected) == len(upstream_shapes)
    assert abstract_shapes(lambda: family_of(kind)(kind, 1008, rngs=nnx.Rngs(0))) == expected
