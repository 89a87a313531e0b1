"""The training losses against sam3's own training loss functions, and their reduction rules."""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from es3_jax.config import LossConfig
from es3_jax.train import losses

torch = pytest.importorskip("torch")


def _sam3_loss_fns():
    """sam3's training losses; their module imports torchmetrics for metrics these tests do not use."""

    sys.modules.setdefault("torchmetrics", types.ModuleType("torchmetrics"))
    return pytest.importorskip("sam3.train.loss.loss_fns")


loss_fns = _sam3_loss_fns()


def _mask_losses(logits, iou_pred, obj_score_logits, targets, valid, cfg) -> losses.MaskLosses:
    """The train step's mask losses: per-(frame, object) terms reduced over the valid entries."""
    return losses.reduce_terms(losses.mask_terms(logits, iou_pred, obj_score_logits, targets, cfg), valid)


@pytest.fixture
def masks():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (5, 3, 24, 20)).astype(np.float32)
    targets = rng.random((5, 1, 24, 20)) < 0.3
    targets[4] = False  # an object absent from the frame
    return logits, np.repeat(targets, 3, axis=1)


def test_per_mask_terms_match_sam3(masks):
    logits, targets = masks
    t_logits, t_targets = torch.from_numpy(logits), torch.from_numpy(targets.astype(np.float32))
    ref_focal = loss_fns.sigmoid_focal_loss(
        t_logits, t_targets, 1.0, alpha=0.25, gamma=2, loss_on_multimask=True, triton=False
    )
    ref_dice = loss_fns.dice_loss(t_logits, t_targets, 1.0, loss_on_multimask=True)
    pred_iou = np.random.default_rng(1).random((5, 3)).astype(np.float32)
    ref_iou = loss_fns.iou_loss(
        t_logits, t_targets, torch.from_numpy(pred_iou), 1.0, loss_on_multimask=True, use_l1_loss=True
    )
    np.testing.assert_allclose(
        losses.focal_per_mask(logits, targets, 0.25, 2.0), ref_focal.numpy(), rtol=1e-5
    )
    np.testing.assert_allclose(losses.dice_per_mask(logits, targets), ref_dice.numpy(), rtol=1e-5)
    ours_iou = jnp.abs(pred_iou - losses.mask_iou(logits, targets))
    np.testing.assert_allclose(ours_iou, ref_iou.numpy(), rtol=1e-5, atol=1e-7)


def test_multimask_supervises_the_lowest_loss_candidate(masks):
    logits, targets = masks
    cfg = LossConfig()
    gt = targets[:, 0]
    iou_pred = np.zeros((5, 3), np.float32)
    out = _mask_losses(logits, iou_pred, np.zeros(5, np.float32), gt, np.ones(5, bool), cfg)
    focal = np.asarray(losses.focal_per_mask(logits, gt[:, None], 0.25, 2.0))
    dice = np.asarray(losses.dice_per_mask(logits, gt[:, None]))
    best = np.argmin(20 * focal + dice, axis=1)
    present = gt.reshape(5, -1).any(axis=1)
    expected_focal = (focal[np.arange(5), best] * present).sum() / 5
    np.testing.assert_allclose(out.focal, expected_focal, rtol=1e-6)
    assert not present[4], "fixture: object 4 is absent"


def test_padded_objects_and_frames_do_not_count(masks):
    logits, targets = masks
    cfg = LossConfig()
    gt = targets[:, 0]
    valid = np.array([True, True, False, False, True])
    base = _mask_losses(logits, np.zeros((5, 3)), np.zeros(5), gt, valid, cfg)
    noisy = logits.copy()
    noisy[~valid] = 1e3  # garbage in the padded slots
    again = _mask_losses(noisy, np.zeros((5, 3)), np.zeros(5), gt, valid, cfg)
    for name, a, b in zip(base._fields, base, again, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=name)


def test_perfect_prediction_has_zero_focal_and_iou_terms():
    gt = np.zeros((2, 16, 16), bool)
    gt[:, 4:10, 3:12] = True
    logits = np.where(gt, 50.0, -50.0)[:, None].astype(np.float32)
    out = _mask_losses(logits, np.ones((2, 1)), np.full(2, 50.0), gt, np.ones(2, bool), LossConfig())
    assert float(out.focal) < 1e-12 and float(out.iou) < 1e-6 and float(out.obj_score) < 1e-12
    assert float(out.dice) < 1e-3


def test_feature_mse_ignores_invalid_entries_and_stops_teacher_gradient():
    s = np.random.default_rng(0).normal(size=(3, 5, 2, 4)).astype(np.float32)
    t = np.zeros_like(s)
    valid = np.array([True, False, True])
    expected = (s[valid] ** 2).mean()
    np.testing.assert_allclose(losses.masked_mean(losses.feature_mse(s, t), valid), expected, rtol=1e-6)
    g_teacher = jax.grad(lambda tt: losses.masked_mean(losses.feature_mse(s, tt), valid))(t)
    assert not np.any(g_teacher), "the MSE term must not send gradients into the teacher"


def test_total_loss_uses_config_weights():
    m = losses.MaskLosses(jnp.float32(1), jnp.float32(2), jnp.float32(3), jnp.float32(4))
    total, terms = losses.total_loss(m, jnp.float32(5), LossConfig(OBJ_SCORE=1.0))
    assert float(total) == 20 * 1 + 2 + 3 + 4 + 5
    assert set(terms) == {"focal", "dice", "iou", "obj_score", "mse", "total"}
