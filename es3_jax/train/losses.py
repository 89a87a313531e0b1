"""Training losses: SAM2's mask losses on the decoded masks and the feature distillation term.

Conventions follow SAM2 training (`MultiStepMultiMasksAndIous`): per object and frame, a sigmoid
focal loss and a dice loss on the mask logits at the model's input resolution, an L1 loss between
the predicted IoU and the IoU the mask actually reaches, and a focal/BCE object-score loss. With
several candidate masks, the mask and dice losses supervise the candidate with the lowest
weighted sum of the two, and the IoU loss supervises every candidate. Mask losses count only on
frames where the object is present. Sums over frames and objects are divided by the number of
objects, so the loss does not depend on how objects are batched. Everything in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from es3_jax.config import LossConfig


class MaskLosses(NamedTuple):
    """Loss terms summed over frames and objects, divided by the number of objects (scalars)."""

    focal: jax.Array
    dice: jax.Array
    iou: jax.Array
    obj_score: jax.Array


def sigmoid_focal(logits: jax.Array, targets: jax.Array, alpha: float, gamma: float) -> jax.Array:
    """Per-pixel focal loss; logits and targets of the same shape. alpha < 0 disables the class weight."""
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    prob = jax.nn.sigmoid(logits)
    ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma if gamma else ce
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def focal_per_mask(logits: jax.Array, targets: jax.Array, alpha: float, gamma: float) -> jax.Array:
    """Mean focal loss per mask: logits `[..., H, W]`, targets broadcastable -> `[...]`."""
    return sigmoid_focal(logits, jnp.broadcast_to(targets, logits.shape), alpha, gamma).mean(axis=(-2, -1))


def dice_per_mask(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """1 - (2|P∩T| + 1) / (|P| + |T| + 1) with soft P = sigmoid(logits): `[..., H, W]` -> `[...]`."""
    prob = jax.nn.sigmoid(logits.astype(jnp.float32))
    targets = jnp.broadcast_to(targets, logits.shape).astype(jnp.float32)
    numerator = 2 * (prob * targets).sum(axis=(-2, -1))
    denominator = prob.sum(axis=(-2, -1)) + targets.sum(axis=(-2, -1))
    return 1 - (numerator + 1) / (denominator + 1)


def mask_iou(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """IoU of the binarised logits (> 0) with the targets: `[..., H, W]` -> `[...]`; 0 when both are empty."""
    pred = logits > 0
    gt = jnp.broadcast_to(targets, logits.shape) > 0
    inter = (pred & gt).sum(axis=(-2, -1)).astype(jnp.float32)
    union = (pred | gt).sum(axis=(-2, -1)).astype(jnp.float32)
    return inter / jnp.maximum(union, 1.0)


class MaskTerms(NamedTuple):
    """Unreduced loss terms per (frame, object) `[...]`: the chosen candidate's focal and dice, the IoU
    loss averaged over candidates, the object-score loss, and whether the object is present."""

    focal: jax.Array
    dice: jax.Array
    iou: jax.Array
    obj_score: jax.Array
    present: jax.Array


def mask_terms(
    logits: jax.Array, iou_pred: jax.Array, obj_score_logits: jax.Array, targets: jax.Array, cfg: LossConfig
) -> MaskTerms:
    """Per-(frame, object) terms: logits `[..., M, H, W]` candidate masks (M = 1 or the multimask
    outputs), iou_pred `[..., M]`, obj_score_logits `[...]`, targets `[..., H, W]` bool."""
    targets = targets[..., None, :, :]
    focal = focal_per_mask(logits, targets, cfg.FOCAL_ALPHA, cfg.FOCAL_GAMMA)
    dice = dice_per_mask(logits, targets)
    iou_l1 = jnp.abs(iou_pred.astype(jnp.float32) - mask_iou(logits, targets))
    best = jnp.argmin(cfg.FOCAL * focal + cfg.DICE * dice, axis=-1)

    def pick(x):
        return jnp.take_along_axis(x, best[..., None], axis=-1)[..., 0]

    present = targets.reshape(*targets.shape[:-3], -1).any(axis=-1).astype(jnp.float32)
    obj = sigmoid_focal(obj_score_logits, present, -1.0, 0.0)
    return MaskTerms(pick(focal), pick(dice), iou_l1.mean(axis=-1), obj, present)


def reduce_terms(terms: MaskTerms, valid: jax.Array) -> MaskLosses:
    """Sum the terms over frames and objects where `valid [..., T, O]`, divided by the number of
    objects. Without the object on a frame its mask is not supervised; the object score learns
    the absence."""
    valid = valid.astype(jnp.float32)
    mask_weight = valid * terms.present
    num_objects = jnp.maximum(_num_objects(valid), 1.0)
    return MaskLosses(
        focal=(terms.focal * mask_weight).sum() / num_objects,
        dice=(terms.dice * mask_weight).sum() / num_objects,
        iou=(terms.iou * mask_weight).sum() / num_objects,
        obj_score=(terms.obj_score * valid).sum() / num_objects,
    )


def _num_objects(valid: jax.Array) -> jax.Array:
    """Objects that carry a loss on some frame: `valid [..., T, O]` -> a scalar count."""
    if valid.ndim < 2:
        return valid.sum()
    return valid.any(axis=-2).sum().astype(jnp.float32)


def feature_mse(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """Mean squared error between memory-conditioned features `[..., H, W, C]` -> `[...]`.

    The teacher's features are the target: a constant for the gradient, whatever they were
    computed from (with `TRAIN.MEMORY_SOURCE student` they depend on the student's masks).
    """
    diff = student.astype(jnp.float32) - jax.lax.stop_gradient(teacher).astype(jnp.float32)
    return jnp.mean(diff**2, axis=(-3, -2, -1))


def masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
    """The mean of `values` over the entries where `valid` holds (0 when none does)."""
    valid = valid.astype(jnp.float32)
    return (values * valid).sum() / jnp.maximum(valid.sum(), 1.0)


def total_loss(masks: MaskLosses, mse: jax.Array | None, cfg: LossConfig) -> tuple[jax.Array, dict]:
    """Weighted sum `FOCAL·focal + DICE·dice + IOU·iou + MSE·mse + OBJ_SCORE·obj_score` and its terms."""
    terms = {"focal": masks.focal, "dice": masks.dice, "iou": masks.iou, "obj_score": masks.obj_score}
    total = (
        cfg.FOCAL * masks.focal
        + cfg.DICE * masks.dice
        + cfg.IOU * masks.iou
        + cfg.OBJ_SCORE * masks.obj_score
    )
    if mse is not None:
        terms["mse"] = mse
        total = total + cfg.MSE * mse
    terms["total"] = total
    return total, terms
