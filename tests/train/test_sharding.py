"""Mesh shapes, parameter partition rules and batch assembly on 8 fake CPU devices."""

import jax
import numpy as np
import pytest

from es3_jax.config import ConfigError, MeshConfig
from es3_jax.train import sharding


def test_mesh_shape_fills_the_data_axis():
    assert sharding.mesh_shape(MeshConfig(FSDP=2), 8) == (4, 2)
    assert sharding.mesh_shape(MeshConfig(DATA=8), 8) == (8, 1)
    with pytest.raises(ConfigError, match=r"MESH\.FSDP 3"):
        sharding.mesh_shape(MeshConfig(FSDP=3), 8)
    with pytest.raises(ConfigError, match=r"MESH\.DATA 3"):
        sharding.mesh_shape(MeshConfig(DATA=3, FSDP=2), 8)


def test_param_rules_then_size_threshold():
    cfg = MeshConfig(FSDP=2, PARAM_RULES=(r"linear1\.kernel=_,fsdp",), FSDP_MIN_SIZE_MB=1.0)
    assert sharding.param_spec("layers.0.linear1.kernel", (256, 2048), cfg, 2) == jax.sharding.PartitionSpec(
        None, "fsdp"
    )
    big = sharding.param_spec("latents", (1024, 512), cfg, 2)  # 2 MB > 1 MB: largest divisible dim
    assert big == jax.sharding.PartitionSpec("fsdp", None)
    assert sharding.param_spec("norm.scale", (256,), cfg, 2) == jax.sharding.PartitionSpec()
    with pytest.raises(ConfigError, match="unknown mesh axes"):
        sharding.param_spec("x", (4,), MeshConfig(PARAM_RULES=("x=model",)), 2)


def test_param_shardings_place_arrays_on_the_mesh():
    mesh = sharding.make_mesh(MeshConfig(FSDP=2))
    params = {"a": {"kernel": np.zeros((8, 4), np.float32)}, "b": np.zeros((3,), np.float32)}
    cfg = MeshConfig(FSDP=2, PARAM_RULES=("a.kernel=fsdp,_",))
    shardings = sharding.param_shardings(params, mesh, cfg)
    placed = jax.device_put(params, shardings)
    assert placed["a"]["kernel"].sharding.shard_shape((8, 4)) == (4, 4)
    assert placed["b"].sharding.is_fully_replicated


def test_global_batch_splits_rows_over_every_device():
    mesh = sharding.make_mesh(MeshConfig(FSDP=2))
    local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
    batch = sharding.global_batch(local, mesh)
    assert batch["x"].shape == (16, 3)
    assert {s.data.shape for s in batch["x"].addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
