"""The optimiser of the seed's recipe: AdamW, linear warm-up then cosine decay, global-norm clipping,
and gradient accumulation up to the effective batch size."""

from __future__ import annotations

import jax
import optax

from es3_jax.config import ConfigError, TrainConfig


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    """0 -> `LR` linearly over `WARMUP_STEPS`, then cosine to 0 at `MAX_STEPS` (optimiser steps)."""
    warmup = min(cfg.WARMUP_STEPS, cfg.MAX_STEPS)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.LR, warmup_steps=warmup, decay_steps=max(cfg.MAX_STEPS, warmup + 1)
    )


def accumulation_steps(cfg: TrainConfig, data_parallel: int) -> int:
    """Micro-batches per optimiser step: `EFFECTIVE_BATCH_SIZE / (BATCH_SIZE · data_parallel)`.

    `data_parallel` is the number of devices the batch is split over (all of them: the batch is
    sharded over both mesh axes).
    """
    per_micro = cfg.BATCH_SIZE * data_parallel
    if cfg.EFFECTIVE_BATCH_SIZE % per_micro:
        raise ConfigError(
            f"TRAIN.EFFECTIVE_BATCH_SIZE {cfg.EFFECTIVE_BATCH_SIZE} is not a multiple of TRAIN.BATCH_SIZE "
            f"{cfg.BATCH_SIZE} × {data_parallel} devices"
        )
    return max(cfg.EFFECTIVE_BATCH_SIZE // per_micro, 1)


def _decay_mask(params):
    """Weight decay on matrices and kernels only: biases, norm scales and learned embeddings of rank 1 are exempt."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig, accumulate: int = 1) -> optax.GradientTransformation:
    """AdamW(β 0.9/0.999, `WEIGHT_DECAY`) after clipping to global norm `CLIP_GRAD`.

    With `accumulate` > 1 the updates are averaged over that many calls and applied on the last
    (`optax.MultiSteps`). Non-finite gradients are skipped without touching the optimiser state.
    """
    inner = optax.chain(
        optax.clip_by_global_norm(cfg.CLIP_GRAD),
        optax.adamw(learning_rate(cfg), b1=0.9, b2=0.999, weight_decay=cfg.WEIGHT_DECAY, mask=_decay_mask),
    )
    return optax.MultiSteps(inner, every_k_schedule=accumulate, should_skip_update_fn=optax.skip_not_finite)
