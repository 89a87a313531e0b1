"""The jitted train and validation steps over a batch of clips.

Parameters travel as plain nested dicts: `trainable` (what the optimiser updates: the student, or
the fine-tuned parts of the tracker) and `frozen` (the rest of the tracker, plus the trunk under
`frozen["trunk"]` when the batch holds frames instead of trunk features). Only `trainable` is
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
from es3_jax.nn.attention import without_cudnn
from es3_jax.params import ModuleTemplate
from es3_jax.train import losses
from es3_jax.train.clip import ClipOutput, run_clip
from es3_jax.train.sharding import batch_sharding, replicated

TRUNK = "trunk"  # key of the trunk's parameters in `frozen`


class Templates(NamedTuple):
    """How to rebuild the modules around parameter dicts."""

    teacher: ModuleTemplate
    student: ModuleTemplate | None  # None when fine-tuning
    trunk: ModuleTemplate | None = None  # set when batches carry frames (DATA.USE_PRECOMPUTED False)


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
    frozen = {k: v for k, v in frozen.items() if k != TRUNK}
    if templates.student is None:
        return templates.teacher({**frozen, **trainable}), None
    return templates.teacher(frozen), templates.student(trainable)


def trunk_features(templates: Templates, frozen: Mapping, batch: Mapping) -> jax.Array:
    """`[B, T, g, g, Ct]` float32: the batch's `embeddings`, or the frozen trunk run on its `images`
    `[B, T, S, S, 3]` (normalised frames), exactly the features `es3 embed` stores before rounding
    them to the store's dtype."""
    if "embeddings" in batch:
        # Embeddings arrive in the store's dtype (bf16 by default): half the host-to-device bytes.
        return batch["embeddings"].astype(jnp.float32)
    if templates.trunk is None:
        raise ValueError("the batch holds images but no trunk template was given (Templates.trunk)")
    trunk = templates.trunk(frozen[TRUNK])
    # One frame of every clip at a time: activations of B frames at once, and the mapped axis (T)
    # is not the sharded one (B), so each device runs its own clips.
    feats = jax.lax.map(trunk, jnp.swapaxes(batch["images"], 0, 1))
    return jax.lax.stop_gradient(jnp.swapaxes(feats, 0, 1))


def _batch_outputs(templates: Templates, trainable, frozen, batch, cfg: Config) -> ClipOutput:
    teacher, student = _modules(templates, trainable, frozen)
    trunk = trunk_features(templates, frozen, batch)
    with without_cudnn():
        return jax.vmap(lambda t, masks: run_clip(teacher, student, t, masks, cfg))(trunk, batch["masks"])


def _valid(batch: Mapping) -> jax.Array:
    """`[B, T-1, O]`: object slots that hold an object, on tracked frames of real clips."""
    t = batch["masks"].shape[1]
    valid = batch["object_valid"] & batch["clip_valid"][:, None]
    return jnp.broadcast_to(valid[:, None, :], (valid.shape[0], t - 1, valid.shape[1]))


def batch_loss(templates: Templates, trainable, frozen, batch, cfg: Config):
    """(total loss, its terms, the clips' outputs) for a batch: a dict of `embeddings [B,T,g,g,Ct]`
    (or `images [B,T,S,S,3]`), `masks [B,T,O,S,S]`, `object_valid [B,O]`, `clip_valid [B]`."""
    out = _batch_outputs(templates, trainable, frozen, batch, cfg)
    valid = _valid(batch)
    masks = losses.reduce_terms(out.terms, valid)
    mse = None if templates.student is None else losses.masked_mean(out.mse, valid)
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
