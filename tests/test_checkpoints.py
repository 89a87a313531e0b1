"""Training checkpoints: round trip, restore onto another mesh, retention, and name resolution."""

import jax
import numpy as np
import optax
import pytest

from es3_jax import checkpoints
from es3_jax.config import MeshConfig
from es3_jax.train import sharding


def _state(mesh, cfg):
    params = {"w": np.arange(64, dtype=np.float32).reshape(8, 8), "b": np.ones(8, np.float32)}
    params = jax.device_put(params, sharding.param_shardings(params, mesh, cfg))
    opt = optax.adamw(1e-3)
    return params, opt.init(params)


def test_saved_on_4x2_restores_on_2x4(tmp_path):
    cfg_a = MeshConfig(FSDP=2, PARAM_RULES=("w=fsdp,_",))
    cfg_b = MeshConfig(FSDP=4, PARAM_RULES=("w=_,fsdp",))
    mesh_a, mesh_b = sharding.make_mesh(cfg_a), sharding.make_mesh(cfg_b)
    params, opt_state = _state(mesh_a, cfg_a)
    mgr = checkpoints.manager(tmp_path)
    checkpoints.save(mgr, 3, params=params, opt_state=opt_state, data_state={"epoch": 1}, meta={"step": 3})

    target_params, target_opt = _state(mesh_b, cfg_b)
    out = checkpoints.restore(checkpoints.manager(tmp_path), 3, params=target_params, opt_state=target_opt)
    np.testing.assert_array_equal(np.asarray(out["params"]["w"]), np.asarray(params["w"]))
    assert out["params"]["w"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert out["data"] == {"epoch": 1} and out["meta"] == {"step": 3}
    assert jax.tree.structure(out["opt_state"]) == jax.tree.structure(opt_state)


def test_retention_and_names(tmp_path):
    mesh = sharding.make_mesh(MeshConfig())
    params, opt_state = _state(mesh, MeshConfig())
    mgr = checkpoints.manager(tmp_path, keep_latest=2, save_every=10)
    jf = {5: 0.5, 10: 0.4, 15: 0.9, 20: 0.3, 25: 0.2, 30: None}
    for step, value in jf.items():
        metrics = None if value is None else {checkpoints.BEST_METRIC: value}
        checkpoints.save(
            mgr, step, params=params, opt_state=opt_state, data_state={}, meta={}, metrics=metrics
        )
    assert sorted(mgr.all_steps()) == [10, 15, 20, 25, 30]  # periodic 10, 20; best 15; latest 25, 30
    assert checkpoints.resolve(tmp_path) == checkpoints.CheckpointRef(tmp_path, 30)
    assert checkpoints.resolve(tmp_path / "ckpt_latest").step == 30
    assert checkpoints.resolve(tmp_path / "ckpt_best").step == 15
    assert checkpoints.resolve(tmp_path / "ckpt_step_20").step == 20
    assert checkpoints.resolve(tmp_path / "checkpoints" / "10").step == 10
    with pytest.raises(
        checkpoints.CheckpointNotFoundError, match=r"step 5 is not among the saved steps \[10, 15"
    ):
        checkpoints.resolve(tmp_path / "ckpt_step_5")
    with pytest.raises(checkpoints.CheckpointNotFoundError, match="no checkpoints/ folder"):
        checkpoints.resolve(tmp_path / "elsewhere")
