"""The loss and trainable-parameter gradients of one fixed micro batch under a config, cached: the
tests that compare configs (remat, precision) share their float32 reference."""

import functools

import jax
import numpy as np

from es3_jax import config as config_lib
from es3_jax import weights
from es3_jax.models.student import student_from_config
from es3_jax.params import flatten, param_dict
from es3_jax.train.step import batch_loss, split_trainable
from es3_jax.train.trainer import templates
from tests.train.runs import LIGHT
from tests.train.test_step import MICRO, _batch


def micro_config(mode: str, overrides: tuple[str, ...] = ()) -> config_lib.Config:
    return config_lib.load(None, [*MICRO, *LIGHT, "TRAIN.MODE", mode, *overrides])


@functools.cache
def weights_of() -> tuple[dict, dict]:
    """(teacher, student) parameters: random initialisation is slow, and no setting compared here
    changes it."""
    cfg = micro_config("distill")
    return weights.teacher(cfg, trunk=False).tracker, param_dict(student_from_config(cfg, seed=1))


@functools.cache
def loss_and_gradients(mode: str, overrides: tuple[str, ...] = ()) -> tuple[float, dict[str, np.ndarray]]:
    """(total loss, `{dotted path: gradient}`) of 2 clips of 3 frames (a prompt, then two tracked frames
    reading a bank) with the micro config + overrides."""
    cfg = micro_config(mode, overrides)
    teacher, student = weights_of()
    trainable, frozen = split_trainable(cfg, teacher, student if mode == "distill" else None)
    run_templates = templates(cfg)
    batch = _batch(cfg, seed=3, batch=2)

    def loss(p):
        return batch_loss(run_templates, p, frozen, batch, cfg)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
    return float(value), {k: np.asarray(v, np.float32) for k, v in flatten(grads).items()}
