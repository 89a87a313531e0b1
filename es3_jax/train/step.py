"""The jitted train and validation steps over a batch of clips.

Parameters travel as plain nested dicts: `trainable` (what the optimiser updates: the student, or
the fine-tuned parts of the tracker) and `frozen` (the rest of the tracker). Only `trainable` is
differentiated, so no gradient can reach a frozen parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from es3_jax.config import Config, ConfigError
from es3_jax.params import ModuleTemplate
from es3_jax.train import losses
from es3_jax.train.clip import ClipOutput, run_clip
from es3_jax.train.sharding import batch_sharding, replicated


class Templates(NamedTuple):
    """How to rebuild the modules around parameter dicts."""

    teacher: ModuleTemplate
    student: ModuleTemplate | None  # None when fine-tuning


def split_trainable(cfg: Config, teacher: Mapping, student: Mapping | None) -> tuple[dict, dict]:
    """(trainable, frozen) parameter dicts: the student when distilling; the tracker parts named by
    `TRAIN.FINETUNE_MODULES` when fine-tuning."""
    if cfg.TRAIN.MODE == "distill":
        return dict(student), dict(teacher)
    names = cfg.TRAIN.FINETUNE_MODULES
    unknown = sorted(set(names) - set(teacher))
    if unknown or not names:
        raise ConfigError(
            f"TRAIN.FINETUNE_MODULES {list(names)}: unknown {unknown}; the tracker has {sorted(teacher)}"
        )
    trainable = {k: v for k, v in teacher.items() if k in names}
    frozen = {k: v for k, v in teacher.items() if k not in names}
    return trainable, frozen


def _modules(templates: Templates, trainable: Mapping, frozen: Mapping):
    if templates.student is None:
        return templates.teacher({**frozen, **trainable}), None
    return templates.teacher(frozen), templates.student(trainable)


def _batch_outputs(templates: Templates, trainable, frozen, batch, cfg: Config) -> ClipOutput:
    teacher, student = _modules(templates, trainable, frozen)
    # Embeddings arrive in the store's dtype (bf16 by default): half the host-to-device bytes.
    trunk = batch["embeddings"].astype(jnp.float32)
    return jax.vmap(lambda t, masks: run_clip(teacher, student, t, masks, cfg))(trunk, batch["masks"])


def _valid(batch: Mapping) -> jax.Array:
    """`[B, T-1, O]`: object slots that hold an object, on tracked frames of real clips."""
    t = batch["masks"].shape[1]
    valid = batch["object_valid"] & batch["clip_valid"][:, None]
    return jnp.broadcast_to(valid[:, None, :], (valid.shape[0], t - 1, valid.shape[1]))


def batch_loss(templates: Templates, trainable, frozen, batch, cfg: Config):
    """(total loss, its terms, the clips' outputs) for a batch: a dict of `embeddings [B,T,g,g,Ct]`,
    `masks [B,T,O,S,S]`, `object_valid [B,O]`, `clip_valid [B]`."""
    out = _batch_outputs(templates, trainable, frozen, batch, cfg)
    valid = _valid(batch)
    masks = losses.reduce_terms(out.terms, valid)
    mse = None
    if templates.student is not None:
        v = valid.astype(jnp.float32)
        mse = (out.mse * v).sum() / jnp.maximum(v.sum(), 1.0)
    total, terms = losses.total_loss(masks, mse, cfg.TRAIN.LOSS)
    return total, (terms, out)


def make_train_step(
    templates: Templates,
    optimizer: optax.GradientTransformation,
    cfg: Config,
    mesh: Mesh,
    param_shardings,
    opt_shardings,
) -> Callable:
    """`step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)`, jitted with the
    batch split over the mesh; trainable and opt_state buffers are donated."""

    def step(trainable, opt_state, frozen, batch):
        def loss_fn(p):
            return batch_loss(templates, p, frozen, batch, cfg)

        (loss, (terms, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        grad_norm = optax.global_norm(grads)
        metrics = {**terms, "grad_norm": grad_norm, "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
        return trainable, opt_state, metrics

    rep = replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(param_shardings, opt_shardings, rep, batch_sharding(mesh)),
        out_shardings=(param_shardings, opt_shardings, rep),
        donate_argnums=(0, 1),
    )


def make_eval_step(templates: Templates, cfg: Config, mesh: Mesh, param_shardings) -> Callable:
    """`eval(trainable, frozen, batch) -> (loss terms, masks [B,T,O,S,S], teacher_masks)`."""

    def evaluate(trainable, frozen, batch):
        _, (terms, out) = batch_loss(templates, trainable, frozen, batch, cfg)
        return terms, out.masks, out.teacher_masks

    return jax.jit(evaluate, in_shardings=(param_shardings, replicated(mesh), batch_sharding(mesh)))
