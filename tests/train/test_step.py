"""The train step: fine-tuning and distillation learn, and sharding does not change the numbers."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from es3_jax import config as config_lib
from es3_jax import weights
from es3_jax.data.pipeline import build_pipeline
from es3_jax.models.student import student_from_config
from es3_jax.models.tracker import SAM3Tracker
from es3_jax.params import ModuleTemplate, flatten, param_dict
from es3_jax.train import optim, sharding
from es3_jax.train.step import TRUNK, Templates, batch_loss, make_train_step, split_trainable, trunk_features
from es3_jax.train.trainer import Trainer, frozen_trunk
from tests import figures
from tests.train.runs import LIGHT, synthetic_store
from tests.train.runs import MICRO as RUN

# The smallest geometry the tracker supports: 56 px frames -> 4 × 4 tokens.
MICRO = [
    "MODEL.TEACHER.IMAGE_SIZE", "56", "MODEL.TEACHER.TRUNK_DIM", "16", "MODEL.TEACHER.D_MODEL", "32",
    "MODEL.TEACHER.MEM_DIM", "16", "MODEL.TEACHER.MEMORY_ATTENTION_FFN_DIM", "64",
    "MODEL.TEACHER.DECODER_MLP_DIM", "64", "MODEL.TEACHER.DECODER_HEADS", "4",
    "MODEL.TRUNK.WIDTH", "16", "MODEL.TRUNK.NUM_HEADS", "2", "MODEL.PERCEIVER.NUM_LATENTS", "4", "MODEL.PERCEIVER.NUM_LATENTS_2D", "4",
    "MODEL.PERCEIVER.WINDOW_SIZE", "2", "MODEL.MEMORY_ATTENTION.POOL_SIZE", "2",
    "TRAIN.BATCH_SIZE", "1", "TRAIN.EFFECTIVE_BATCH_SIZE", "8", "TRAIN.WARMUP_STEPS", "0",
    "TRAIN.MAX_STEPS", "100", "TRAIN.LR", "1e-3", "TRAIN.LOSS.OBJ_SCORE", "1.0",
]  # fmt: skip


def _setup(mode: str, mesh_cfg: dict, devices):
    # Fine-tuning with one tracking mask: with SAM's three candidates, the loss supervises the best
    # one, and on a near-tie the choice flips with float round-off between meshes.
    single = ["MODEL.TEACHER.NUM_MULTIMASK_OUTPUTS", "1"] if mode == "finetune" else []
    cfg = config_lib.load(None, [*MICRO, *LIGHT, *single, "TRAIN.MODE", mode])
    cfg = config_lib.merge(cfg, {"MESH": mesh_cfg})
    t = cfg.MODEL.TEACHER
    teacher = param_dict(SAM3Tracker(t, rngs=nnx.Rngs(0)))
    student = param_dict(student_from_config(cfg, seed=1)) if mode == "distill" else None
    templates = Templates(
        ModuleTemplate(lambda: SAM3Tracker(t, rngs=nnx.Rngs(0))),
        ModuleTemplate(lambda: student_from_config(cfg, seed=0)) if mode == "distill" else None,
    )
    mesh = sharding.make_mesh(cfg.MESH, devices)
    trainable, frozen = split_trainable(cfg, teacher, student)
    shards = sharding.param_shardings(trainable, mesh, cfg.MESH)
    trainable = jax.device_put(trainable, shards)
    opt = optim.make_optimizer(cfg.TRAIN, 1)
    opt_state, opt_shards = sharding.init_optimizer(opt, trainable, shards, mesh)
    step = make_train_step(templates, opt, cfg, mesh, shards, opt_shards)
    return cfg, mesh, step, trainable, opt_state, jax.device_put(frozen, sharding.replicated(mesh))


def _batch(cfg, seed: int, batch: int = 8, frames: int = 3, objects: int = 2):
    t = cfg.MODEL.TEACHER
    rng = np.random.default_rng(seed)
    masks = np.zeros((batch, frames, objects, t.IMAGE_SIZE, t.IMAGE_SIZE), bool)
    for b in range(batch):
        for o in range(objects):
            y, x = rng.integers(0, t.IMAGE_SIZE - 24, size=2)
            for f in range(frames):
                masks[b, f, o, y + f : y + f + 20, x : x + 18] = True
    return {
        "embeddings": rng.normal(size=(batch, frames, t.grid, t.grid, t.TRUNK_DIM)).astype(np.float32),
        "masks": masks,
        "object_valid": np.array([[True, b % 2 == 0] for b in range(batch)]),
        "clip_valid": np.ones(batch, bool),
    }


@pytest.mark.numerics
@pytest.mark.parametrize("mode", [pytest.param("finetune", marks=pytest.mark.slow), "distill"])
def test_eight_devices_data4_fsdp2_equal_one_device(mode):
    assert jax.device_count() >= 8, "conftest fakes 8 CPU devices"
    # Both meshes start from one state that 5 single-device steps moved off the random
    # initialisation. At that initialisation the object-score gate is closed and the ConvNeXt layer
    # scales are 1e-6, so many fine-tuning gradients are float-round-off-sized (about 1e-9, below
    # Adam's epsilon), and Adam's first step turns their reduction-order noise into parameter
    # differences of about 1e-4. A real fine-tune starts from a trained tracker, where they are not.
    cfg, mesh, step, trainable, opt_state, frozen = _setup(mode, {"DATA": 1, "FSDP": 1}, jax.devices()[:1])
    for seed in range(1, 6):
        trainable, opt_state, _ = step(
            trainable, opt_state, frozen, sharding.global_batch(_batch(cfg, seed), mesh)
        )
    start = jax.tree.map(np.asarray, (trainable, opt_state))
    runs = {}
    for name, mesh_cfg, devices in (
        ("one", {"DATA": 1, "FSDP": 1}, jax.devices()[:1]),
        # FSDP_MIN_SIZE_MB 0 shards every divisible parameter, so fsdp really splits the weights.
        ("eight", {"DATA": 4, "FSDP": 2, "FSDP_MIN_SIZE_MB": 0.0}, jax.devices()[:8]),
    ):
        cfg, mesh, step, trainable, opt_state, frozen = _setup(mode, mesh_cfg, devices)
        trainable, opt_state = jax.device_put(
            start, jax.tree.map(lambda x: x.sharding, (trainable, opt_state))
        )
        losses = []
        batch = sharding.global_batch(_batch(cfg, 0), mesh)
        for _ in range(3):
            trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch)
            losses.append(float(metrics["total"]))
        runs[name] = (flatten(jax.tree.map(np.asarray, trainable)), losses)
    (one, loss_one), (eight, loss_eight) = runs["one"], runs["eight"]
    figures.check(
        f"{mode} losses, 8 devices against 1", figures.relative_error(loss_eight, loss_one), figures.REORDERED
    )
    assert loss_one[2] < loss_one[0], f"{mode}: the loss did not fall over 3 steps: {loss_one}"
    diffs = {k: float(np.max(np.abs(eight[k] - one[k]))) for k in one}
    worst_key = max(diffs, key=diffs.get)
    # Parameters are measured absolutely: Adam moves each by about the learning rate a step, whatever its size.
    figures.check(
        f"{mode} params after 3 steps, 8 devices against 1 (absolute, at {worst_key})",
        diffs[worst_key],
        figures.REORDERED,
    )


# ---- DATA.USE_PRECOMPUTED False: the trunk inside the step ------------------------------------------


@pytest.fixture(scope="module")
def frames_and_store(tmp_path_factory):
    """10 synthetic videos and their float32 store written by `es3 embed` with the micro trunk."""

    root = tmp_path_factory.mktemp("on_the_fly")
    batch = ("TRAIN.BATCH_SIZE", "1", "TRAIN.EFFECTIVE_BATCH_SIZE", "8", "MESH.FSDP", "2")
    overrides = synthetic_store(root, 10, [*RUN, *batch])
    stored = config_lib.load(None, overrides)
    on_the_fly = config_lib.load(None, [*overrides, "DATA.USE_PRECOMPUTED", "False"])
    return stored, on_the_fly, root


def _first_batches(stored, on_the_fly):
    a, b = (
        next(iter(build_pipeline(c, batch_size=8, process_index=0, process_count=1)))
        for c in (stored, on_the_fly)
    )
    assert "images" not in a and "embeddings" not in b
    np.testing.assert_array_equal(a["video_index"], b["video_index"])
    np.testing.assert_array_equal(a["frame_indices"], b["frame_indices"])
    return a, b


def test_trunk_in_the_step_computes_the_stored_features(frames_and_store):
    stored, on_the_fly, root = frames_and_store
    a, b = _first_batches(stored, on_the_fly)
    template, params, fingerprint = frozen_trunk(on_the_fly, weights.teacher(on_the_fly, trunk=True))
    assert fingerprint == json.loads((root / "emb" / "global_metadata.json").read_text())["trunk"]
    templates = Templates(None, None, template)
    feats = jax.jit(lambda p, x: trunk_features(templates, {TRUNK: p}, {"images": x}))(params, b["images"])
    ref = a["embeddings"].astype(np.float32)
    err = float(np.max(np.abs(np.asarray(feats) - ref)) / np.max(np.abs(ref)))
    print(f"[on the fly] trunk features in the step vs `es3 embed` store: relative error {err:.2e}")
    assert feats.shape == ref.shape and err <= 1e-5


@pytest.mark.slow
def test_step_on_frames_equals_step_on_the_store(frames_and_store, tmp_path):
    """The first batch's loss and gradients (what a step applies) through the trainer's wiring:
    frames through the trunk inside the step, or the store. Gradients, not Adam's update: Adam
    turns the round-off of a near-zero gradient into a full ±LR step."""

    stored, on_the_fly, _ = frames_and_store
    _first_batches(stored, on_the_fly)
    runs = {}
    for name, cfg in (("store", stored), ("frames", on_the_fly)):
        trainer = Trainer(cfg, tmp_path / name)
        batch = trainer._global(next(trainer.train_data.iterator()))
        learner = trainer.learner
        templates = learner.templates

        def loss(trainable, frozen, batch, templates=templates, cfg=cfg):
            return batch_loss(templates, trainable, frozen, batch, cfg)[0]

        value, grads = jax.jit(jax.value_and_grad(loss))(learner.trainable, learner.frozen, batch)
        runs[name] = (float(value), flatten(jax.tree.map(np.asarray, grads)))
        trainer.log.close()
    (loss_store, g_store), (loss_frames, g_frames) = runs["store"], runs["frames"]
    scale = max(float(np.max(np.abs(g))) for g in g_store.values())
    err = max(float(np.max(np.abs(g_frames[k] - g_store[k]))) for k in g_store) / scale
    print(
        f"[on the fly] one step on frames vs on the store: loss {loss_frames:.7g} vs {loss_store:.7g}, "
        f"gradients relative error {err:.2e}"
    )
    assert loss_frames == pytest.approx(loss_store, rel=1e-5)
    assert scale > 0 and err <= 1e-5
