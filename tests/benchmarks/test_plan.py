"""`es3 bench plan`: the compiled step's per-device memory, on the test session's 8 fake devices."""

import argparse

import jax
import numpy as np
import pytest

from benchmarks import plan
from benchmarks.gpu_targets import TARGETS, topology
from benchmarks.train import config_for
from es3_jax import weights
from es3_jax.train import sharding
from es3_jax.train.trainer import Learner
from tests.train.runs import LIGHT
from tests.train.test_step import MICRO


def _bytes_per_device(tree) -> int:
    """Bytes one device holds of `tree`'s arrays (replicated arrays whole, sharded ones its shard)."""
    return sum(
        int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


# Compiles the micro run's train step on 8 devices (about a minute here): in `make test-slow`, which
# keeps `make test` within its time.
@pytest.mark.slow
def test_plan_accounts_for_every_argument_byte():
    p = argparse.ArgumentParser()
    plan.add_arguments(p)
    overrides = [
        *MICRO,
        *LIGHT,
        "DATA.NUM_FRAMES",
        "3",
        "DATA.MAX_OBJECTS",
        "2",
        "MODEL.COMPUTE_DTYPE",
        "float32",
    ]
    args = p.parse_args(["--config", "tiny", "--devices", "8", *overrides])
    plan.use_fake_devices(args.devices)  # the session's 8 devices: accepted, not restarted
    cfg = config_for("tiny", "distill", overrides)
    mesh = sharding.make_mesh(cfg.MESH)
    learner = Learner(cfg, mesh, 1, weights.teacher(cfg, trunk=False))
    record = plan.record(args, cfg, mesh, learner, batch_size=2)
    assert record["mesh"] == "8×1" and record["clips_per_device"] == 2 and record["remat"] == "none"

    # The arguments are the parameters, the optimiser state and this device's 2 clips of the batch.
    batch = plan.abstract_batch(cfg, 2 * mesh.size, mesh)
    expected = _bytes_per_device((learner.trainable, learner.opt_state, learner.frozen, batch))
    assert abs(record["argument_gib"] * plan.GIB - expected) <= 1024, (
        record["argument_gib"] * plan.GIB,
        expected,
    )
    peak = record["argument_gib"] + record["output_gib"] - record["aliased_gib"] + record["temp_gib"]
    assert np.isclose(record["peak_gib"], peak) and record["temp_gib"] > 0
    # The trainable parameters and their optimiser state are donated: the outputs reuse them.
    assert record["aliased_gib"] * plan.GIB >= _bytes_per_device(learner.trainable)
    assert record["memory_path_tflop"] > 0 and record["xla_tflop"] > 0
    assert record["H100_step_s"] > 0 and record["fits_H100"] and record["fits_H200"]


@pytest.mark.slow
def test_the_seed_config_fits_an_h100_at_its_default_batch():
    """What `es3 train --config configs/efficient_memory.yaml` compiles on a GPU (bf16, 4 clips per
    device, the config's TRAIN.REMAT), planned on this session's 8 fake devices."""
    p = argparse.ArgumentParser()
    plan.add_arguments(p)
    args = p.parse_args([])
    cfg = config_for("efficient_memory", "distill", ["MODEL.COMPUTE_DTYPE", "bfloat16"])
    mesh = sharding.make_mesh(cfg.MESH)
    learner = Learner(cfg, mesh, 1, weights.teacher(cfg, trunk=False))
    record = plan.record(args, cfg, mesh, learner, cfg.TRAIN.BATCH_SIZE)
    print(record)
    assert record["clips_per_device"] == 4 and record["remat"] == cfg.TRAIN.REMAT
    assert record["fits_H100"], f"{record['peak_gib']:.1f} GiB per device does not fit an H100"


# XLA:GPU compiles the seed step for an H100 in about 6 minutes here (deviceless; the CUDA plugin).
@pytest.mark.slow
def test_the_seed_config_fits_an_h100_by_the_gpu_compilers_own_plan():
    p = argparse.ArgumentParser()
    plan.add_arguments(p)
    args = p.parse_args(["--target", "h100"])
    cfg = config_for("efficient_memory", "distill", ["MODEL.COMPUTE_DTYPE", "bfloat16"])
    mesh = sharding.make_mesh(cfg.MESH, topology(TARGETS["h100"], 8))
    learner = Learner(cfg, mesh, 1, weights.teacher(cfg, trunk=False), abstract=True)
    record = plan.record(args, cfg, mesh, learner, cfg.TRAIN.BATCH_SIZE)
    print(record)
    assert record["compiler"] == "XLA:GPU h100" and record["mesh"] == "8×1"
    assert record["fits_H100"], f"{record['peak_gib']:.1f} GiB per device does not fit an H100"
    assert "materialised" in record["attention"] and record["roofline_s"] > 0
