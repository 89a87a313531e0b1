"""EdgeTAM's 2-D spatial Perceiver Resampler: one memory frame -> a few hundred latent tokens.

Two sets of learned latents share the same layers and final LayerNorm:

* global latents attend to every memory token, whose sine encoding is added to the projected
  keys *and* values (EdgeTAM's quirk, kept for weight compatibility); their output position is 0;
* 2-D latents form a g×g grid, each attending only to its own window of the memory (no
  positional term); their output position is the sine encoding of the latent grid.

Windows are `window_size` pixels square, so the memory is resized bilinearly (half-pixel, no
antialiasing) to `g·window_size` per side when it is not already that size (72 -> 64 for the
default 16×16 grid; 18×18 latents tile 72 exactly). Every layer is pre-norm with bias-free
projections: cross-attention, FFN, self-attention, FFN.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from es3_jax.nn.attention import attend
from es3_jax.nn.layers import Dtype, call_layer, gelu, layer_norm, linear, resize_bilinear
from es3_jax.nn.position_encoding import sine_2d

LAYER_NORM_EPS = 1e-5


def latent_grid(num_latents_2d: int) -> int:
    """Side g of the square grid of `num_latents_2d` 2-D latents."""
    g = math.isqrt(num_latents_2d)
    if g * g != num_latents_2d or g == 0:
        raise ValueError(f"num_latents_2d={num_latents_2d} is not a positive square number")
    return g


class _Projections(nnx.Module):
    """Bias-free `to_q`, fused `to_kv` (keys in the first half of the outputs) and `to_out`."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Dtype):
        self.num_heads = num_heads
        self.to_q = linear(dim, dim, use_bias=False, rngs=rngs, dtype=dtype)
        self.to_kv = linear(dim, 2 * dim, use_bias=False, rngs=rngs, dtype=dtype)
        self.to_out = linear(dim, dim, use_bias=False, rngs=rngs, dtype=dtype)

    def attend(self, queries: jax.Array, context: jax.Array, pos: jax.Array | None) -> jax.Array:
        """queries `[B, Nq, D]`, context `[B, Nk, D]`, pos `[B, Nk, D]` or None -> `[B, Nq, D]`."""
        q = self._heads(self.to_q(queries))
        k, v = jnp.split(self.to_kv(context), 2, axis=-1)
        if pos is not None:
            # Unprojected, on keys and values alike (EdgeTAM's `PerceiverAttention`).
            k = k + pos.astype(k.dtype)
            v = v + pos.astype(v.dtype)
        out = attend(q, self._heads(k), self._heads(v))
        return self.to_out(out.reshape(*out.shape[:2], -1))

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:2], self.num_heads, x.shape[-1] // self.num_heads)


class CrossAttention(_Projections):
    """Latents attend to the (normalised) memory tokens."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        super().__init__(dim, num_heads, rngs=rngs, dtype=dtype)
        self.norm_x = layer_norm(dim, eps=LAYER_NORM_EPS, rngs=rngs, dtype=dtype)
        self.norm_latents = layer_norm(dim, eps=LAYER_NORM_EPS, rngs=rngs, dtype=dtype)

    def __call__(self, latents: jax.Array, x: jax.Array, pos: jax.Array | None) -> jax.Array:
        return self.attend(self.norm_latents(latents), self.norm_x(x), pos)


class SelfAttention(_Projections):
    """Latents attend to each other."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        super().__init__(dim, num_heads, rngs=rngs, dtype=dtype)
        self.norm = layer_norm(dim, eps=LAYER_NORM_EPS, rngs=rngs, dtype=dtype)

    def __call__(self, latents: jax.Array) -> jax.Array:
        h = self.norm(latents)
        return self.attend(h, h, None)


class FeedForward(nnx.Module):
    """LayerNorm, bias-free Linear to `mult·dim`, exact GELU, bias-free Linear back."""

    def __init__(self, dim: int, mult: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        self.norm = layer_norm(dim, eps=LAYER_NORM_EPS, rngs=rngs, dtype=dtype)
        self.up = linear(dim, mult * dim, use_bias=False, rngs=rngs, dtype=dtype)
        self.down = linear(mult * dim, dim, use_bias=False, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(gelu(self.up(self.norm(x))))


class PerceiverLayer(nnx.Module):
    """Cross-attention + FFN, then self-attention + FFN, each with a residual."""

    def __init__(self, dim: int, num_heads: int, ff_mult: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        self.attn = CrossAttention(dim, num_heads, rngs=rngs, dtype=dtype)
        self.ff = FeedForward(dim, ff_mult, rngs=rngs, dtype=dtype)
        self.self_attn = SelfAttention(dim, num_heads, rngs=rngs, dtype=dtype)
        self.self_ff = FeedForward(dim, ff_mult, rngs=rngs, dtype=dtype)

    def __call__(self, latents: jax.Array, x: jax.Array, pos: jax.Array | None) -> jax.Array:
        """latents `[B, L, D]`, x `[B, N, D]`, pos `[B, N, D]` or None -> `[B, L, D]`."""
        latents = latents + self.attn(latents, x, pos)
        latents = latents + self.ff(latents)
        latents = latents + self.self_attn(latents)
        return latents + self.self_ff(latents)


class PerceiverResampler(nnx.Module):
    """Memory frame `[B, H, W, D]` -> `num_latents + num_latents_2d` tokens `[B, N, D]` and their positions."""

    def __init__(
        self,
        dim: int = 64,
        num_latents: int = 256,
        num_latents_2d: int = 256,
        depth: int = 2,
        num_heads: int = 1,
        ff_mult: int = 4,
        window_size: int = 4,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        remat: bool = False,
    ):
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the perceiver width {dim}")
        if num_latents < 1:
            raise ValueError(f"num_latents={num_latents}: the perceiver needs global latents")
        self.grid = latent_grid(num_latents_2d)
        self.window_size = window_size
        self.latents = nnx.Param(jax.random.normal(rngs.params(), (num_latents, dim), jnp.float32))
        self.latents_2d = nnx.Param(jax.random.normal(rngs.params(), (num_latents_2d, dim), jnp.float32))
        self.layers = nnx.List(
            [PerceiverLayer(dim, num_heads, ff_mult, rngs=rngs, dtype=dtype) for _ in range(depth)]
        )
        self.norm = layer_norm(dim, eps=LAYER_NORM_EPS, rngs=rngs, dtype=dtype)
        self.dtype = dtype
        self.remat = remat  # recompute each layer in the backward pass (gradient checkpointing)

    @property
    def num_tokens(self) -> int:
        return self.latents.shape[0] + self.latents_2d.shape[0]

    def __call__(self, features: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
        """features, pos: `[B, H, W, D]` (a memory frame and its sine encoding).

        Returns tokens and positions `[B, num_latents + g², D]`: global latents first (position
        0), then the 2-D latents row-major on their grid (sine position of the grid).
        """
        b, h, w, d = features.shape
        x = features.astype(self.dtype)

        latents = jnp.broadcast_to(self.latents[...].astype(self.dtype), (b, *self.latents.shape))
        memory = x.reshape(b, h * w, d)
        memory_pos = pos.reshape(b, h * w, d)
        for layer in self.layers:
            latents = call_layer(layer, latents, memory, memory_pos, remat=self.remat)
        latents = self.norm(latents)

        g, s = self.grid, self.window_size
        side = g * s
        if (h, w) != (side, side):
            x = resize_bilinear(x, side, side)
        windows = x.reshape(b, g, s, g, s, d).transpose(0, 1, 3, 2, 4, 5).reshape(b * g * g, s * s, d)
        # One query token per window; broadcast before reshaping so that any batch size works.
        latents_2d = jnp.broadcast_to(self.latents_2d[...].astype(self.dtype), (b, g * g, d))
        latents_2d = latents_2d.reshape(b * g * g, 1, d)
        for layer in self.layers:
            latents_2d = call_layer(layer, latents_2d, windows, None, remat=self.remat)
        latents_2d = self.norm(latents_2d.reshape(b, g * g, d))

        tokens = jnp.concatenate([latents, latents_2d], axis=1)
        grid_pos = sine_2d(g, g, d).reshape(1, g * g, d)
        tokens_pos = jnp.concatenate(
            [jnp.zeros((b, latents.shape[1], d), tokens.dtype), jnp.broadcast_to(grid_pos, (b, g * g, d))],
            axis=1,
        ).astype(tokens.dtype)
        return tokens, tokens_pos
