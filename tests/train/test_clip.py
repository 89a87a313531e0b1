"""One training clip (`es3_jax.train.clip`) through the train step's loss: the distillation target is
the teacher's features, a constant for the student's gradient whatever builds the memory bank."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from es3_jax.params import flatten
from es3_jax.train.step import batch_loss, split_trainable
from es3_jax.train.trainer import templates
from tests import figures
from tests.train.gradients import micro_config, weights_of
from tests.train.test_step import _batch

# The feature MSE alone, so that its gradient is all there is.
MSE_ONLY = (
    "TRAIN.LOSS.FOCAL",
    "0",
    "TRAIN.LOSS.DICE",
    "0",
    "TRAIN.LOSS.IOU",
    "0",
    "TRAIN.LOSS.OBJ_SCORE",
    "0",
)


@pytest.mark.numerics
def test_mse_gradient_holds_the_teacher_features_constant():
    """With `TRAIN.MEMORY_SOURCE student` the teacher's bank is written from the student's masks, so
    the teacher's features depend on the student's parameters; the MSE's gradient must still be the
    one with the teacher's features held constant (they are the regression target, not an output)."""
    cfg = micro_config("distill", ("TRAIN.MEMORY_SOURCE", "student", *MSE_ONLY))
    teacher, student = weights_of()
    # Objects judged present: else every mask is the constant NO_OBJ_SCORE and every pointer
    # `no_obj_ptr`, and no gradient could reach the teacher's bank whatever wrote it.
    head = teacher["mask_decoder"]["pred_obj_score_head"]["layers"]
    last = max(head)
    teacher = {
        **teacher,
        "mask_decoder": {
            **teacher["mask_decoder"],
            "pred_obj_score_head": {
                "layers": {**head, last: {**head[last], "bias": np.full_like(head[last]["bias"], 10.0)}}
            },
        },
    }
    trainable, frozen = split_trainable(cfg, teacher, student)
    run_templates = templates(cfg)
    # Three frames (the default): frame 1's student mask is in the teacher's bank when frame 2 is tracked.
    batch = _batch(cfg, seed=3, batch=2)
    t = batch["masks"].shape[1]
    valid = batch["object_valid"] & batch["clip_valid"][:, None]
    weight = jnp.broadcast_to(valid[:, None, :], (valid.shape[0], t - 1, valid.shape[1])).astype(jnp.float32)

    def loss(p):
        return batch_loss(run_templates, p, frozen, batch, cfg)[0]

    def features(p):
        out = batch_loss(run_templates, p, frozen, batch, cfg)[1][1]
        return out.student_features, out.teacher_features

    @jax.jit
    def held_constant(p):
        """(the MSE, its gradient with the teacher's features held constant): the cotangent of the
        teacher's features is zero, that of the student's the MSE's derivative."""
        (s, t), pullback = jax.vjp(features, p)
        share = weight / jnp.maximum(weight.sum(), 1.0) / (s.shape[-3] * s.shape[-2] * s.shape[-1])
        mse = (((s - t) ** 2).sum(axis=(-3, -2, -1)) * share).sum()
        return mse, pullback((2 * (s - t) * share[..., None, None, None], jnp.zeros_like(t)))[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
    ref_value, ref_grads = held_constant(trainable)
    got, want = flatten(jax.tree.map(np.asarray, grads)), flatten(jax.tree.map(np.asarray, ref_grads))
    scale = max(float(np.abs(g).max()) for g in want.values())
    err = max(float(np.abs(got[k] - want[k]).max()) for k in want) / scale
    assert scale > 0, "the held-constant gradient is zero: the test would prove nothing"
    # Two programs built differently (the loss's and a vjp of the features): the same sums, other orders.
    figures.check(
        "MSE, loss against held-constant", abs(float(value) / float(ref_value) - 1), figures.REORDERED
    )
    figures.check("MSE gradient against the held-constant gradient", err, figures.REORDERED)
