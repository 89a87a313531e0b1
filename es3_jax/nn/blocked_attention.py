"""Softmax attention in query × key blocks with an online softmax: the logits are never held whole.

For each block of queries a scan over blocks of keys keeps, per query, the running maximum logit
`m`, the running sum `l` of exponentials below it and the unnormalised output, rescaling them
when the maximum grows. The backward pass (a custom VJP) recomputes each block's probabilities
from the saved `m` and `l` instead of keeping them, so memory grows with `N·D`, not `Nq·Nk`, and
the blocks stay small enough to live in cache on a CPU.

The result is a dense softmax over `where(mask, q·kᵀ/√D + bias, float32 min)`: a query whose keys
are all masked averages them uniformly. Keys that only pad the last block are left out (−∞).
Logits, `m`, `l` and the output accumulator are float32 whatever the inputs' dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
MASKED = float(jnp.finfo(F32).min)  # a masked logit: finite, so an all-masked row stays defined


class Blocks(NamedTuple):
    """Target block lengths: queries and keys per block (a shorter sequence is one block).

    `logits`: when set, batch entries are taken a few at a time, as many as keep a block's
    `entries × H × bq × bk` logits within it (a CPU's caches); None takes the whole batch at once.
    """

    q: int
    k: int
    logits: int | None = None


class _Layout(NamedTuple):
    """The padded problem's block lengths and its number of real keys (static)."""

    bq: int
    bk: int
    keys: int


def block_length(n: int, target: int) -> int:
    """`n` when it fits `target`, else the shortest multiple of 8 that covers `n` in `ceil(n / target)` blocks."""
    if n <= target:
        return n
    count = -(-n // target)
    return -(-n // (8 * count)) * 8


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    blocks: Blocks,
) -> jax.Array:
    """q: `[B, Nq, H, D]`, k and v: `[B, Nk, H, D]` -> `[B, Nq, H, D]` in v's dtype.

    bias: additive logits broadcastable to `[B, H, Nq, Nk]` (differentiable); mask: boolean, the same
    broadcast, True = attend. The scale is `1/sqrt(D)`.
    """
    b, nq, h, _ = q.shape
    nk = k.shape[1]
    layout = _Layout(block_length(nq, blocks.q), block_length(nk, blocks.k), nk)
    bias = None if bias is None else _as_logit_term(jnp.asarray(bias), nq, nk)
    mask = None if mask is None else _as_logit_term(jnp.asarray(mask), nq, nk)
    group = b if blocks.logits is None else _batch_group(b, blocks.logits // (h * layout.bq * layout.bk))
    if group == b:
        return _padded_attention(q, k, v, bias, mask, layout)

    def batched(t: jax.Array | None) -> jax.Array | None:
        return None if t is None or t.shape[0] == 1 else t.reshape(b // group, group, *t.shape[1:])

    def entries(xs):
        qg, kg, vg, bg, mg = xs
        return _padded_attention(qg, kg, vg, bias if bg is None else bg, mask if mg is None else mg, layout)

    out = lax.map(entries, tuple(batched(t) for t in (q, k, v, bias, mask)))
    return out.reshape((*q.shape[:3], v.shape[-1]))


def _batch_group(b: int, fits: int) -> int:
    """The largest divisor of the batch `b` up to `fits` (at least 1)."""
    return max(d for d in range(1, min(b, max(fits, 1)) + 1) if b % d == 0)


def _as_logit_term(x: jax.Array, nq: int, nk: int) -> jax.Array:
    """A bias or mask broadcastable to `[B, H, Nq, Nk]` as 4-D `[B|1, H|1, Nq|1, Nk|1]`."""
    if x.ndim > 4 or x.shape[-1] not in (1, nk) or (x.ndim > 1 and x.shape[-2] not in (1, nq)):
        raise ValueError(
            f"a logit term of shape {x.shape} does not broadcast against [B, H, {nq}, {nk}] logits"
        )
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _padded_attention(q, k, v, bias, mask, layout: _Layout) -> jax.Array:
    """`blocked_attention` on one group of batch entries, 4-D logit terms."""
    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    nq = q.shape[1]
    qh = _pad(heads_first(q), 2, layout.bq)
    kh, vh = (_pad(heads_first(t), 2, layout.bk) for t in (k, v))
    bias, mask = (None if t is None else _pad_logit_term(t, layout) for t in (bias, mask))
    out = _attention(qh, kh, vh, bias, mask, layout)
    return heads_first(out[:, :, :nq])


def _pad(x: jax.Array, axis: int, block: int) -> jax.Array:
    extra = -x.shape[axis] % block
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _pad_logit_term(x: jax.Array, layout: _Layout) -> jax.Array:
    """A 4-D bias or mask padded along its full query and key axes."""
    if x.shape[2] > 1:
        x = _pad(x, 2, layout.bq)
    if x.shape[3] > 1:
        x = _pad(x, 3, layout.bk)
    return x


def _block(x: jax.Array, axis: int, index: jax.Array, length: int) -> jax.Array:
    """The `index`-th block of `length` along `axis`, or `x` itself where it broadcasts along it."""
    if x.shape[axis] == 1:
        return x
    return lax.dynamic_slice_in_dim(x, index * length, length, axis)


def _tile(x: jax.Array, i: jax.Array, j: jax.Array, layout: _Layout) -> jax.Array:
    return _block(_block(x, 2, i, layout.bq), 3, j, layout.bk)


def _logits(qi, kj, bias, mask, i, j, layout: _Layout) -> jax.Array:
    """Block (i, j) of the float32 logits `[B, H, bq, bk]` with bias, mask and padded keys applied."""
    scale = 1.0 / jnp.sqrt(F32(qi.shape[-1]))
    s = jnp.einsum("bhqd,bhkd->bhqk", qi, kj, preferred_element_type=F32) * scale
    if bias is not None:
        s = s + _tile(bias, i, j, layout).astype(F32)
    if mask is not None:
        s = jnp.where(_tile(mask, i, j, layout), s, MASKED)
    if layout.keys % layout.bk:
        real = j * layout.bk + lax.iota(jnp.int32, layout.bk) < layout.keys
        s = jnp.where(real, s, -jnp.inf)
    return s


def _loop(body: Callable, init, count: int):
    """`lax.scan(body, init, arange(count))`, or `body` called once without a loop for one block."""
    if count == 1:
        carry, out = body(init, jnp.int32(0))
        return carry, jax.tree.map(lambda x: x[None], out)
    return lax.scan(body, init, jnp.arange(count))


def _unblock(x: jax.Array) -> jax.Array:
    """`[blocks, B, H, n, ...]` -> `[B, H, blocks·n, ...]`."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(*x.shape[:2], -1, *x.shape[4:])


def _forward(q, k, v, bias, mask, layout: _Layout):
    b, h, _, d = q.shape

    def rows(_, i):
        qi = _block(q, 2, i, layout.bq)

        def step(carry, j):
            m, l, acc = carry
            s = _logits(qi, _block(k, 2, j, layout.bk), bias, mask, i, j, layout)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            rescale = jnp.exp(m - m_new)
            pv = jnp.einsum(
                "bhqk,bhkd->bhqd", p.astype(v.dtype), _block(v, 2, j, layout.bk), preferred_element_type=F32
            )
            return (m_new, l * rescale + p.sum(-1), acc * rescale[..., None] + pv), None

        init = (
            jnp.full((b, h, layout.bq), MASKED, F32),
            jnp.zeros((b, h, layout.bq), F32),
            jnp.zeros((b, h, layout.bq, d), F32),
        )
        (m, l, acc), _ = _loop(step, init, k.shape[2] // layout.bk)
        return None, ((acc / l[..., None]).astype(v.dtype), m, l)

    _, (out, m, l) = _loop(rows, None, q.shape[2] // layout.bq)
    return _unblock(out), _unblock(m), _unblock(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, bias, mask, layout: _Layout):
    """Padded, heads-first q `[B, H, Nq, D]`, k/v `[B, H, Nk, D]` -> `[B, H, Nq, D]`."""
    return _forward(q, k, v, bias, mask, layout)[0]


def _attention_fwd(q, k, v, bias, mask, layout: _Layout):
    out, m, l = _forward(q, k, v, bias, mask, layout)
    return out, (q, k, v, bias, mask, out, m, l)


def _attention_bwd(layout: _Layout, residuals, g):
    q, k, v, bias, mask, out, m, l = residuals
    scale = 1.0 / jnp.sqrt(F32(q.shape[-1]))
    delta = jnp.sum(g.astype(F32) * out.astype(F32), axis=-1)  # [B, H, Nq]: rowsum(dO ∘ O)
    b, h, _, d = k.shape

    def cols(carry, j):
        kj, vj = _block(k, 2, j, layout.bk), _block(v, 2, j, layout.bk)

        def rows(inner, i):
            dq, dbias, dk, dv = inner
            qi, gi = _block(q, 2, i, layout.bq), _block(g, 2, i, layout.bq)
            s = _logits(qi, kj, bias, mask, i, j, layout)
            p = jnp.exp(s - _block(m, 2, i, layout.bq)[..., None]) / _block(l, 2, i, layout.bq)[..., None]
            dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p.astype(g.dtype), gi, preferred_element_type=F32)
            dp = jnp.einsum("bhqd,bhkd->bhqk", gi, vj, preferred_element_type=F32)
            ds = p * (dp - _block(delta, 2, i, layout.bq)[..., None])
            if mask is not None:
                ds = jnp.where(_tile(mask, i, j, layout), ds, 0.0)
            if bias is not None:
                dbias = _add_tile(dbias, ds, i, j, layout)
            ds_in = ds.astype(q.dtype)
            dqi = jnp.einsum("bhqk,bhkd->bhqd", ds_in, kj, preferred_element_type=F32) * scale
            dq = lax.dynamic_update_slice_in_dim(dq, _block(dq, 2, i, layout.bq) + dqi, i * layout.bq, 2)
            dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds_in, qi, preferred_element_type=F32) * scale
            return (dq, dbias, dk, dv), None

        dq, dbias = carry
        zeros = jnp.zeros((b, h, layout.bk, d), F32)
        (dq, dbias, dk, dv), _ = _loop(rows, (dq, dbias, zeros, zeros), q.shape[2] // layout.bq)
        return (dq, dbias), (dk, dv)

    dbias0 = None if bias is None else jnp.zeros(bias.shape, F32)
    (dq, dbias), (dk, dv) = _loop(cols, (jnp.zeros(q.shape, F32), dbias0), k.shape[2] // layout.bk)
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return dq.astype(q.dtype), _unblock(dk).astype(k.dtype), _unblock(dv).astype(v.dtype), dbias, None


def _add_tile(dbias: jax.Array, ds: jax.Array, i: jax.Array, j: jax.Array, layout: _Layout) -> jax.Array:
    """Adds `ds [B, H, bq, bk]`, summed over the axes the bias broadcasts along, to its tile (i, j)."""
    ds = ds.sum(axis=tuple(a for a in range(4) if dbias.shape[a] == 1), keepdims=True)
    start = (0, 0, i * layout.bq if dbias.shape[2] > 1 else 0, j * layout.bk if dbias.shape[3] > 1 else 0)
    return lax.dynamic_update_slice(dbias, lax.dynamic_slice(dbias, start, ds.shape) + ds, start)


_attention.defvjp(_attention_fwd, _attention_bwd)
