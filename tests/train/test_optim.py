"""The optimiser: schedule shape, accumulation equal to one large batch, non-finite updates skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from es3_jax.config import ConfigError, TrainConfig
from es3_jax.train import optim


def test_warmup_then_cosine():
    cfg = TrainConfig(LR=1e-3, WARMUP_STEPS=10, MAX_STEPS=110)
    lr = optim.learning_rate(cfg)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(lr(60)), 5e-4, rtol=1e-5)  # half-way down the cosine
    assert float(lr(110)) < 1e-9


def test_accumulation_steps_from_effective_batch():
    assert optim.accumulation_steps(TrainConfig(BATCH_SIZE=4, EFFECTIVE_BATCH_SIZE=256), 8) == 8
    with pytest.raises(ConfigError, match="EFFECTIVE_BATCH_SIZE 100"):
        optim.accumulation_steps(TrainConfig(BATCH_SIZE=4, EFFECTIVE_BATCH_SIZE=100), 8)


def _loss(params, x):
    return jnp.mean((x @ params["w"] - 1.0) ** 2)


def test_accumulated_micro_batches_equal_one_large_batch():
    cfg = TrainConfig(LR=1e-2, WARMUP_STEPS=0, MAX_STEPS=100, CLIP_GRAD=1e9)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    params = {"w": jnp.ones((3, 2))}

    big = optim.make_optimizer(cfg, 1)
    state = big.init(params)
    updates, state = big.update(jax.grad(_loss)(params, x), state, params)
    expected = optax.apply_updates(params, updates)

    acc = optim.make_optimizer(cfg, 4)
    state = acc.init(params)
    p = params
    for micro in np.split(x, 4):
        updates, state = acc.update(jax.grad(_loss)(p, micro), state, p)
        p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(p["w"], expected["w"], rtol=1e-6)


def test_non_finite_gradients_are_skipped():
    cfg = TrainConfig(LR=1e-2, WARMUP_STEPS=0, MAX_STEPS=100)
    opt = optim.make_optimizer(cfg, 1)
    params = {"w": jnp.ones((3, 2))}
    state = opt.init(params)
    bad = {"w": jnp.full((3, 2), jnp.nan)}
    updates, new_state = opt.update(bad, state, params)
    assert not np.any(np.asarray(updates["w"]))
    for a, b in zip(
        jax.tree.leaves(new_state.inner_opt_state), jax.tree.leaves(state.inner_opt_state), strict=True
    ):
        np.testing.assert_array_equal(a, b)
