"""Axial 2-D rotary position embedding, with the layout SAM3 uses.

A head of dimension D is viewed as D/2 complex pairs of *adjacent* channels `(2c, 2c+1)`
(not "rotate-half"). The first D/4 pairs rotate with the token's x position, the next D/4
with its y position, at frequencies `θ^(-4c/D)`.

Rotation is expressed through per-token angle tables, so any token can carry any position:
keys of several memory frames repeat their frame's grid, and tokens that must not be rotated
(object pointers) simply get angle 0, which is an exact identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grid_positions(height: int, width: int, scale: float = 1.0) -> jax.Array:
    """Row-major `(x, y)` positions of a `height × width` grid -> `[height·width, 2]` float32."""
    n = jnp.arange(height * width)
    x = (n % width).astype(jnp.float32) * scale
    y = (n // width).astype(jnp.float32) * scale
    return jnp.stack([x, y], axis=-1)


def axial_angles(positions: jax.Array, head_dim: int, theta: float = 10000.0) -> jax.Array:
    """Rotation angles for `(x, y)` positions `[N, 2]` -> `[N, head_dim // 2]` float32."""
    quarter = head_dim // 4
    freqs = 1.0 / (theta ** (jnp.arange(0, head_dim, 4)[:quarter].astype(jnp.float32) / head_dim))
    pos = positions.astype(jnp.float32)
    return jnp.concatenate([pos[:, :1] * freqs, pos[:, 1:2] * freqs], axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate `x [..., N, D]` by `angles [N, D/2]` (or broadcastable), computed in float32."""
    dtype = x.dtype
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    re, im = xf[..., 0], xf[..., 1]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(dtype)
