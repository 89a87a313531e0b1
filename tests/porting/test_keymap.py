"""The key tables cover the real upstream tracker in both directions, and the transformers renames
cover the real transformers model."""

import numpy as np
import pytest

from es3_jax.config import TrackerConfig
from es3_jax.models.tracker import expected_param_shapes
from porting.keymap import CONV, CONV_T, LINEAR, TRACKER_TABLE
from tests import upstream


@pytest.fixture(scope="module")
def upstream_model():
    seed = upstream.fresh_seed()
    return upstream.sam3_checkpoint_dict(upstream.build_tracker(seed), upstream.build_neck(seed))


def test_every_upstream_key_is_mapped_or_ignored_and_maps_back(upstream_model):
    expected = expected_param_shapes(TrackerConfig())
    mapped = {}
    for key, value in upstream_model.items():
        if not TRACKER_TABLE.consumes(key):
            continue
        if TRACKER_TABLE.is_ignored(key):
            continue
        hit = TRACKER_TABLE.to_jax(key)
        assert hit is not None, f"no rule for upstream key {key}"
        path, transform = hit
        assert path not in mapped, f"{key} and {mapped.get(path)} map to the same es3 path {path}"
        mapped[path] = key
        assert transform.jax_shape(tuple(value.shape)) == expected[path], key
        assert TRACKER_TABLE.to_torch(path)[0] == key
    assert set(mapped) == set(expected), f"es3 parameters without a source: {set(expected) - set(mapped)}"
    ignored = sorted(k for k in upstream_model if TRACKER_TABLE.consumes(k) and TRACKER_TABLE.is_ignored(k))
    assert ignored == [
        *(
            f"detector.backbone.vision_backbone.sam2_convs.3.{n}"
            for n in ("conv_1x1.bias", "conv_1x1.weight", "conv_3x3.bias", "conv_3x3.weight")
        ),
        "tracker.no_mem_pos_enc",
    ]


@pytest.mark.parametrize("transform", [LINEAR, CONV, CONV_T])
def test_transforms_invert_bit_exactly(transform):
    x = (
        np.random.default_rng()
        .standard_normal((3, 5) if transform is LINEAR else (3, 5, 2, 4))
        .astype(np.float32)
    )
    back = transform.to_torch(transform.to_jax(x))
    assert back.tobytes() == x.tobytes() and back.flags.c_contiguous
