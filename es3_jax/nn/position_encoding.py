"""Parameter-free position encodings of the SAM3 tracker.

All tables are computed in float32, as upstream does, and returned channels-last.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sine_2d(height: int, width: int, num_feats: int, temperature: float = 10000.0) -> jax.Array:
    """DETR-style normalised sine encoding of an `height × width` grid -> `[height, width, num_feats]`.

    Half the channels encode y, then half encode x; within each half sin and cos alternate.
    Positions are `2π·(i+1)/(n + 1e-6)`.
    """
    half = num_feats // 2
    scale = 2.0 * jnp.pi
    eps = 1e-6
    y = jnp.arange(1, height + 1, dtype=jnp.float32) / (height + eps) * scale
    x = jnp.arange(1, width + 1, dtype=jnp.float32) / (width + eps) * scale
    dim_t = jnp.arange(half, dtype=jnp.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / half)

    def encode(p: jax.Array) -> jax.Array:
        p = p[:, None] / dim_t
        return jnp.stack([jnp.sin(p[:, 0::2]), jnp.cos(p[:, 1::2])], axis=-1).reshape(p.shape[0], half)

    pos_y = jnp.broadcast_to(encode(y)[:, None, :], (height, width, half))
    pos_x = jnp.broadcast_to(encode(x)[None, :, :], (height, width, half))
    return jnp.concatenate([pos_y, pos_x], axis=-1)


def sine_1d(positions: jax.Array, dim: int, temperature: float = 10000.0) -> jax.Array:
    """Sine encoding of scalar positions `[...]` -> `[..., dim]`: a sin block, then a cos block."""
    half = dim // 2
    dim_t = jnp.arange(half, dtype=jnp.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / half)
    p = positions.astype(jnp.float32)[..., None] / dim_t
    return jnp.concatenate([jnp.sin(p), jnp.cos(p)], axis=-1)


def random_fourier(coords: jax.Array, gaussian: jax.Array) -> jax.Array:
    """SAM's random Fourier features of normalised `(x, y)` coordinates in `[0, 1]`.

    coords: `[..., 2]`; gaussian: `[2, F]` -> `[..., 2F]` as `[sin | cos]`.
    """
    c = 2.0 * coords.astype(jnp.float32) - 1.0
    c = 2.0 * jnp.pi * (c @ gaussian.astype(jnp.float32))
    return jnp.concatenate([jnp.sin(c), jnp.cos(c)], axis=-1)
