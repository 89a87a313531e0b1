"""The blocked online-softmax attention (`es3_jax.nn.blocked_attention`) against the dense softmax it
replaces: outputs and gradients, every kind of logit term, padded blocks, batch groups, and no
array of the whole logits in the compiled program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from es3_jax.nn.blocked_attention import Blocks, block_length, blocked_attention
from tests import upstream
from tests.figures import relative_error, softmax_tolerance

GRADIENT_TOL = 1e-5


def dense_attention(q, k, v, bias=None, mask=None):
    """The attention core as it was: the whole `[B, H, Nq, Nk]` float32 logits, masked, softmaxed."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def dense_attention_logits(q, k, bias):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    return logits if bias is None else logits + bias


# name: (B, Nq, Nk, H, D, bias shape, mask shape, blocks); None = no term. The logits reach a
# magnitude of about 20, where a softmax passes on its float32 rounding twentyfold.
CASES = {
    "self-attention, padded query and key blocks": (2, 45, 45, 2, 16, None, None, Blocks(16, 16)),
    "memory bank: per-key bias and mask, one object's keys all masked": (
        3,
        40,
        70,
        1,
        32,
        (3, 1, 1, 70),
        (3, 1, 1, 70),
        Blocks(16, 24),
    ),
    "relative-position bias per head, one window at a time": (
        4,
        49,
        49,
        3,
        8,
        (1, 3, 49, 49),
        None,
        Blocks(64, 64, logits=3 * 49 * 49),
    ),
    "one block (no loop)": (2, 20, 30, 2, 16, (30,), None, Blocks(64, 64)),
}


def _inputs(seed: int, b, nq, nk, h, d, bias_shape, mask_shape):
    rng = np.random.default_rng(seed)
    # Queries and keys of norm ~sqrt(20·sqrt(d)) put logits q·k/sqrt(d) at magnitude ~20.
    scale = np.sqrt(20.0 / np.sqrt(d))
    q = jnp.asarray(rng.normal(size=(b, nq, h, d)) * scale, jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, nk, h, d)) * scale, jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, nk, h, d)), jnp.float32)
    bias = None if bias_shape is None else jnp.asarray(rng.normal(size=bias_shape) * 3, jnp.float32)
    mask = None
    if mask_shape is not None:
        mask = rng.random(mask_shape) > 0.3
        mask[-1] = False  # a query with nothing to attend averages every key, as the dense softmax does
        mask = jnp.asarray(mask)
    return q, k, v, bias, mask


@pytest.mark.numerics
@pytest.mark.parametrize("case", list(CASES))
def test_blocked_attention_is_the_dense_softmax(case: str):
    b, nq, nk, h, d, bias_shape, mask_shape, blocks = CASES[case]
    q, k, v, bias, mask = _inputs(upstream.fresh_seed(), b, nq, nk, h, d, bias_shape, mask_shape)
    largest = float(jnp.abs(dense_attention_logits(q, k, bias)).max())
    tol = 2 * softmax_tolerance(largest, reduction=nk)

    ours = jax.jit(lambda *a: blocked_attention(*a, bias=bias, mask=mask, blocks=blocks))(q, k, v)
    ref = dense_attention(q, k, v, bias, mask)
    upstream.report(f"{case}: output (logits up to {largest:.0f})", ours, ref, tol)

    # A loss that weighs every output channel differently, so no gradient cancels by symmetry.
    weights = jnp.cos(jnp.arange(d, dtype=jnp.float32))

    def loss(fn):
        return lambda q, k, v, bias: jnp.sum(fn(q, k, v, bias) * weights)

    diff = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    blocked = jax.jit(
        jax.grad(
            loss(lambda q, k, v, bias: blocked_attention(q, k, v, bias=bias, mask=mask, blocks=blocks)), diff
        )
    )
    dense = jax.grad(loss(lambda q, k, v, bias: dense_attention(q, k, v, bias, mask)), diff)
    for name, ours_g, ref_g in zip(
        "qkvb"[: len(diff)], blocked(q, k, v, bias), dense(q, k, v, bias), strict=True
    ):
        upstream.report(f"{case}: d{name}", ours_g, ref_g, GRADIENT_TOL)


def test_bfloat16_inputs_keep_float32_statistics():
    q, k, v, _, _ = _inputs(upstream.fresh_seed(), 2, 40, 300, 2, 32, None, None)
    q16, k16, v16 = (t.astype(jnp.bfloat16) for t in (q, k, v))
    ours = blocked_attention(q16, k16, v16, blocks=Blocks(16, 64))
    assert ours.dtype == jnp.bfloat16
    # The reference sees the same rounded inputs in float32: what is left is the rounding of the
    # unnormalised weights and of the output to bfloat16 (8 bits), not of any softmax statistic.
    ref = dense_attention(*(t.astype(jnp.float32) for t in (q16, k16, v16)))
    assert relative_error(ours, ref) < 2 * 2.0**-8


def test_no_array_of_the_whole_logits_is_held_forward_or_backward():
    b, nq, nk, h, d = 1, 1024, 4096, 1, 64
    q = jax.ShapeDtypeStruct((b, nq, h, d), jnp.float32)
    k = jax.ShapeDtypeStruct((b, nk, h, d), jnp.float32)
    blocks = Blocks(128, 512)

    def attention(q, k, v):
        return blocked_attention(q, k, v, blocks=blocks)

    logits_bytes = b * h * nq * nk * 4
    forward = jax.jit(attention).lower(q, k, k).compile().memory_analysis()
    backward = jax.jit(jax.grad(lambda *a: attention(*a).sum(), (0, 1, 2))).lower(q, k, k).compile()
    assert forward.temp_size_in_bytes < logits_bytes / 8, forward
    assert backward.memory_analysis().temp_size_in_bytes < logits_bytes / 8, backward.memory_analysis()


def test_a_logit_term_that_does_not_broadcast_is_refused_naming_its_shape():
    q = jnp.zeros((1, 8, 1, 4))
    with pytest.raises(ValueError, match=r"shape \(1, 1, 8, 7\) does not broadcast against \[B, H, 8, 9\]"):
        blocked_attention(
            q,
            jnp.zeros((1, 9, 1, 4)),
            jnp.zeros((1, 9, 1, 4)),
            bias=jnp.zeros((1, 1, 8, 7)),
            blocks=Blocks(4, 4),
        )


@pytest.mark.parametrize(("n", "target"), [(5184, 512), (36352, 1024), (100, 512), (1025, 1024)])
def test_block_length_covers_the_sequence_in_the_fewest_blocks(n: int, target: int):
    length = block_length(n, target)
    blocks = -(-n // length)
    assert length * blocks >= n and blocks == -(-n // target)
    assert length == n or (length % 8 == 0 and length <= target and length * blocks - n < 8 * blocks)
