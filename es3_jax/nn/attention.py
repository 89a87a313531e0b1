"""Multi-head attention with optional rotary positions, additive key bias and key masking.

One module serves the mask decoder's two-way transformer (no RoPE), the teacher memory
attention (RoPE on queries and spatial keys) and the student variants (pooled keys with a
log(p²) bias, compressed memories with their own key positions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from es3_jax.nn.layers import Dtype, linear
from es3_jax.nn.rope import apply_rope


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention with logits and softmax in float32.

    q: `[B, Nq, H, Dh]`, k and v: `[B, Nk, H, Dh]` -> `[B, Nq, H, Dh]`.
    bias: additive logits broadcastable to `[B, H, Nq, Nk]`; mask: boolean, same broadcast, True = attend.
    The scale is `1/sqrt(Dh)`, as in torch's `scaled_dot_product_attention`.
    """
    # The scope names this core's operations in compiled programs (benchmarks/gpu_program.py reads
    # how each attention was compiled by it).
    with jax.named_scope("attend"):
        scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class Attention(nnx.Module):
    """SAM's `Attention`: q/k/v projections to `embed_dim // downsample_rate`, heads, output projection.

    Parameter names mirror upstream (`q_proj`, `k_proj`, `v_proj`, `out_proj`).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        downsample_rate: int = 1,
        kv_in_dim: int | None = None,
        dtype: Dtype = jnp.float32,
    ):
        internal = embed_dim // downsample_rate
        if internal % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the internal width {internal}")
        kv_in = kv_in_dim or embed_dim
        self.num_heads = num_heads
        self.q_proj = linear(embed_dim, internal, rngs=rngs, dtype=dtype)
        self.k_proj = linear(kv_in, internal, rngs=rngs, dtype=dtype)
        self.v_proj = linear(kv_in, internal, rngs=rngs, dtype=dtype)
        self.out_proj = linear(internal, embed_dim, rngs=rngs, dtype=dtype)

    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        q_angles: jax.Array | None = None,
        k_angles: jax.Array | None = None,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """q: `[B, Nq, C]`, k/v: `[B, Nk, Ckv]` -> `[B, Nq, C]`.

        q_angles `[Nq, Dh/2]` and k_angles `[Nk, Dh/2]` (or batched `[B, N, Dh/2]`) rotate the
        projected queries and keys; a key with angle 0 is left as it is.
        """
        q, k, v = self.project_qkv(q, k, v, q_angles=q_angles, k_angles=k_angles)
        return self.attend_projected(q, k, v, bias=bias, mask=mask)

    def project_qkv(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        q_angles: jax.Array | None = None,
        k_angles: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Project and split heads -> `[B, N, H, Dh]` each, RoPE applied to q and k when given."""
        q = self._heads(self.q_proj(q))
        k = self._heads(self.k_proj(k))
        v = self._heads(self.v_proj(v))
        if q_angles is not None:
            q = apply_rope(q, _per_head(q_angles))
        if k_angles is not None:
            k = apply_rope(k, _per_head(k_angles))
        return q, k, v

    def attend_projected(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Attention over already projected heads, then the output projection -> `[B, Nq, C]`."""
        out = attend(q, k, v, bias=bias, mask=mask)
        return self.out_proj(out.reshape(*out.shape[:2], -1))

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:2], self.num_heads, x.shape[-1] // self.num_heads)


def _per_head(angles: jax.Array) -> jax.Array:
    """`[N, A]` or `[B, N, A]` -> broadcastable against `[B, N, H, Dh]` (the same angles in every head)."""
    return angles[..., None, :]
