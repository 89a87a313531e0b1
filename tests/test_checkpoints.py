"""Training checkpoints: round trip, restore onto another mesh, retention, name resolution,
checksums and damaged checkpoints, and a file system that refuses a write."""

import errno
import os
import resource
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from es3_jax import checkpoints
from es3_jax.config import MeshConfig
from es3_jax.params import ParamMismatchError
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

    # One checksum per array whatever its sharding: the numpy array's, the one saved on 4x2, and
    # the one computed on 2x4 when reading it back (a mismatch would be a CheckpointDamagedError).
    target_params, target_opt = _state(mesh_b, cfg_b)
    assert checkpoints.checksums(params) == checkpoints.checksums(jax.tree.map(np.asarray, target_params))
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
    # The newest, and the older steps to read instead should it be damaged.
    assert checkpoints.resolve(tmp_path) == checkpoints.CheckpointRef(tmp_path, 30, (25, 20, 15, 10))
    assert checkpoints.resolve(tmp_path / "ckpt_latest").step == 30
    assert checkpoints.resolve(tmp_path / "ckpt_best") == checkpoints.CheckpointRef(tmp_path, 15)
    assert checkpoints.resolve(tmp_path / "ckpt_step_20").step == 20
    assert checkpoints.resolve(tmp_path / "checkpoints" / "10").step == 10
    with pytest.raises(
        checkpoints.CheckpointNotFoundError, match=r"step 5 is not among the saved steps \[10, 15"
    ):
        checkpoints.resolve(tmp_path / "ckpt_step_5")
    with pytest.raises(checkpoints.CheckpointNotFoundError, match="no checkpoints/ folder"):
        checkpoints.resolve(tmp_path / "elsewhere")


# --- damaged checkpoints -------------------------------------------------------------------------

# Random bits: incompressible, so the array's bytes lie verbatim in orbax's data file, where a
# test can find and change them.
PARAMS = {"w": np.random.default_rng(0).integers(0, 2**32, (64, 64), dtype=np.uint32).view(np.float32)}
OPT = optax.adam(1e-3).init(PARAMS)
NEEDLE = PARAMS["w"].tobytes()[4096:4112]


def _data_file(step_dir: Path) -> Path:
    """The file under `<step>/params` that holds the bytes of PARAMS["w"]."""
    (found,) = [f for f in (step_dir / "params").rglob("*") if f.is_file() and NEEDLE in f.read_bytes()]
    return found


def _flip(step_dir: Path) -> None:
    """Overwrite 8 bytes of w's data: orbax reads the file without complaint."""
    path = _data_file(step_dir)
    data = bytearray(path.read_bytes())
    at = data.index(NEEDLE)
    data[at : at + 8] = bytes(255 - b for b in data[at : at + 8])
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped bytes": (_flip, r"params w does not match the checksum"),
    "cut data file": (lambda d: os.truncate(_data_file(d), 1000), r"unreadable \(ValueError: OUT_OF_RANGE"),
    "no params/_METADATA": (lambda d: (d / "params" / "_METADATA").unlink(), r"unreadable .*_METADATA"),
    "no meta/metadata": (lambda d: (d / "meta" / "metadata").unlink(), r"unreadable .*meta/metadata"),
}


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> Path:
    """A run folder with the checkpoints of steps 1 and 2 (the same arrays)."""
    run = tmp_path_factory.mktemp("two_steps")
    mgr = checkpoints.manager(run)
    for step in (1, 2):
        checkpoints.save(mgr, step, params=PARAMS, opt_state=OPT, data_state={}, meta={"step": step})
    return run


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_step_is_refused_by_name_and_skipped_as_the_latest(two_steps, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    hurt, message = DAMAGE[damage]
    hurt(run / "checkpoints" / "2")
    step2 = rf"{run}/checkpoints/2: {message}"

    with pytest.raises(checkpoints.CheckpointDamagedError, match=step2):
        checkpoints.restore(checkpoints.manager(run, read_only=True), 2, params=PARAMS, opt_state=OPT)
    with pytest.raises(checkpoints.CheckpointDamagedError, match=step2):  # a named step: no fallback
        checkpoints.read(checkpoints.resolve(run / "ckpt_step_2"))
    warnings = []
    step, params, meta = checkpoints.read(checkpoints.resolve(run / "ckpt_latest"), warn=warnings.append)
    assert step == 1 and meta == {"step": 1}
    assert params["w"].tobytes() == PARAMS["w"].tobytes()
    assert len(warnings) == 1 and "checkpoints/2" in warnings[0]


def test_resume_skips_the_damaged_latest_and_sets_it_aside(two_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    _flip(run / "checkpoints" / "2")

    resumed = checkpoints.resume(checkpoints.resume_ref("auto", run), run, params=PARAMS, opt_state=OPT)
    assert resumed.step == 1 and resumed.restored["meta"] == {"step": 1}
    assert len(resumed.skipped) == 1 and "params w does not match" in resumed.skipped[0]
    # Kept for inspection, out of the way of the run's next save of step 2.
    assert resumed.set_aside == run / "checkpoints_set_aside" and (resumed.set_aside / "2").is_dir()
    mgr = checkpoints.manager(run)
    assert mgr.all_steps() == [1]
    checkpoints.save(mgr, 2, params=PARAMS, opt_state=OPT, data_state={}, meta={"step": 2})

    _flip(run / "checkpoints" / "2")
    _flip(run / "checkpoints" / "1")
    with pytest.raises(
        checkpoints.CheckpointDamagedError, match=rf"{run}/checkpoints: no readable checkpoint"
    ):
        checkpoints.resume(checkpoints.resume_ref("auto", run), run, params=PARAMS, opt_state=OPT)


def test_a_checkpoint_of_another_config_is_refused_not_skipped(two_steps, tmp_path):
    """Other shapes than the saved ones are the config's fault: an error naming the array, with no
    fallback to older steps (which would not fit either)."""
    params = {"w": np.zeros((64, 32), np.float32)}
    with pytest.raises(
        ParamMismatchError,
        match=r"checkpoints/2: .*\n  shape mismatch: w: shape \(64, 64\), expected \(64, 32\)",
    ):
        checkpoints.resume(
            checkpoints.resolve(two_steps), tmp_path, params=params, opt_state=optax.adam(1e-3).init(params)
        )


def test_resume_auto_in_a_fresh_folder_starts_fresh_and_a_missing_name_is_an_error(tmp_path):
    assert checkpoints.resume_ref("auto", tmp_path / "fresh") is None
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert checkpoints.resume_ref("auto", tmp_path / "empty") is None
    with pytest.raises(checkpoints.CheckpointNotFoundError, match="no checkpoints/ folder"):
        checkpoints.resume_ref(str(tmp_path / "fresh" / "ckpt_step_3"), tmp_path / "fresh")


# --- a file system that refuses the write ----------------------------------------------------------


def test_a_refused_write_names_the_folder_and_keeps_the_earlier_steps(tmp_path):
    """Files cannot grow past 1 MiB (RLIMIT_FSIZE, SIGXFSZ ignored), as on a full disk: saving a
    4 MiB array is an error naming the folder and the reason, step 1 stays readable, and no part of
    step 2 is left."""
    mgr = checkpoints.manager(tmp_path)
    checkpoints.save(mgr, 1, params=PARAMS, opt_state=OPT, data_state={}, meta={"step": 1})
    big = {"w": np.random.default_rng(1).integers(0, 2**32, (1024, 1024), dtype=np.uint32).view(np.float32)}
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, limits[1]))
    try:
        with pytest.raises(checkpoints.CheckpointWriteError) as refused:
            checkpoints.save(mgr, 2, params=big, opt_state=OPT, data_state={}, meta={"step": 2})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert str(refused.value).startswith(f"{tmp_path / 'checkpoints'}: cannot write the checkpoint of step 2")
    assert "File too large [EFBIG]" in str(refused.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    assert checkpoints.read(checkpoints.resolve(tmp_path))[0] == 1
    # A full disk reads the same through tensorstore, which puts the OS error code in its message.
    full = ValueError("RESOURCE_EXHAUSTED: Failed to write 397272 bytes: No space left [os_error_code='28']")
    assert checkpoints.write_error(full) == f"{os.strerror(errno.ENOSPC)} [ENOSPC]"
