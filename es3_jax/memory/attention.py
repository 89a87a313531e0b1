"""SAM3's memory attention: conditions the current frame's features on the memory bank.

A stack of pre-norm layers (self-attention, cross-attention to the memories, ReLU FFN) over the
current frame's tokens, with axial RoPE on the queries (from the query grid) and on the keys
(angles given by the caller, so any key can carry any position, and angle 0 leaves a key
unrotated). The same code serves the teacher and the student variants:

* key positions are an input (`key_angles`), so compressed memories bring their own;
* `key_mask` masks unused slots of a fixed-size memory bank exactly;
* `kv_transform` rewrites the projected, rotated keys and values before attention (e.g. p×p pooling
  with a log(p²) logit bias) without a second copy of the layer;
* the number of layers is a constructor argument and `select_layers` picks teacher layers to
  initialise a shallower stack;
* `pooled_memory` is the student's kv_transform: EfficientTAM's Eq. 5 p×p pooling of the spatial
  tokens of every memory frame with a log(p²) logit bonus, object pointers untouched.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from es3_jax.nn.attention import Attention
from es3_jax.nn.layers import Dtype, call_layer, layer_norm, linear
from es3_jax.nn.rope import axial_angles, grid_positions

# Upstream adds the query positional encoding to the input at this weight (`pos_enc_at_input`).
INPUT_POS_WEIGHT = 0.1
LAYER_NORM_EPS = 1e-5


class ProjectedMemory(NamedTuple):
    """The cross-attention's keys and values after projection and RoPE, with per-key logit terms.

    k, v: `[B, Nk, H, Dh]`; bias: additive logits `[B, Nk]` (or `[Nk]`) or None; mask: bool
    `[B, Nk]` (True = attend) or None.
    """

    k: jax.Array
    v: jax.Array
    bias: jax.Array | None
    mask: jax.Array | None


KVTransform = Callable[[ProjectedMemory], ProjectedMemory]


def pool_memory(
    memory: ProjectedMemory, *, num_frames: int, prefix: int, grid: tuple[int, int], pool: int
) -> ProjectedMemory:
    """EfficientTAM Eq. 5 pooling of projected, rotated keys and values (a `KVTransform`).

    The memory holds `num_frames` frames of `prefix + gh·gw` tokens each (`prefix` unpooled
    tokens, e.g. global latents, then a row-major `grid = (gh, gw)`), then any number of
    object-pointer tokens. Each frame's grid is averaged over `pool × pool` cells and the pooled
    tokens get `log(pool²)` added to their logits: exactly full attention over every pooled
    token repeated `pool²` times. Prefix and pointer tokens are kept as they are. A pooled
    token is valid when its whole cell is. Output order: per frame `[prefix | pooled grid]`,
    then the pointers.
    """
    gh, gw = grid
    if gh % pool or gw % pool:
        raise ValueError(f"pool size {pool} does not divide the memory grid {grid}")
    if memory.bias is not None:
        raise ValueError("pool_memory expects memory without a logit bias")
    per_frame = prefix + gh * gw
    spatial = num_frames * per_frame
    if memory.k.shape[1] < spatial:
        raise ValueError(f"{memory.k.shape[1]} memory tokens cannot hold {num_frames} frames of {per_frame}")
    ph, pw = gh // pool, gw // pool

    def pooled(t: jax.Array, reduce) -> jax.Array:
        b, rest = t.shape[0], t.shape[2:]
        frames = t[:, :spatial].reshape(b, num_frames, per_frame, *rest)
        cells = frames[:, :, prefix:].reshape(b, num_frames, ph, pool, pw, pool, *rest)
        cells = reduce(cells, axis=(3, 5)).reshape(b, num_frames, ph * pw, *rest)
        frames = jnp.concatenate([frames[:, :, :prefix], cells], axis=2).reshape(b, -1, *rest)
        return jnp.concatenate([frames, t[:, spatial:]], axis=1)

    frame_bias = jnp.concatenate(
        [jnp.zeros((prefix,), jnp.float32), jnp.full((ph * pw,), math.log(pool * pool), jnp.float32)]
    )
    num_ptr = memory.k.shape[1] - spatial
    bias = jnp.concatenate([jnp.tile(frame_bias, num_frames), jnp.zeros((num_ptr,), jnp.float32)])
    mask = None if memory.mask is None else pooled(memory.mask, jnp.all)

    def mean(t: jax.Array, axis) -> jax.Array:
        # Averaging p² bf16 values in bf16 loses bits; the mean is taken in float32.
        return jnp.mean(t.astype(jnp.float32), axis=axis).astype(t.dtype)

    return ProjectedMemory(pooled(memory.k, mean), pooled(memory.v, mean), bias, mask)


def pooled_memory(num_frames: int, prefix: int, grid: tuple[int, int], pool: int) -> KVTransform | None:
    """The `pool_memory` transform for this layout, or None when `pool` is 1 (nothing to pool)."""
    if pool == 1:
        return None
    return functools.partial(pool_memory, num_frames=num_frames, prefix=prefix, grid=grid, pool=pool)


def select_layers(params: Mapping, layers: Sequence[int]) -> dict:
    """Parameters of a `MemoryAttention` with `len(layers)` layers, copied from the chosen layers of `params`.

    `params` is a nested parameter dict of a deeper stack (list indices as int keys); the final
    norm is shared.
    """
    source = params["layers"]
    missing = [i for i in layers if i not in source]
    if missing:
        raise ValueError(f"layers {missing} not in the source stack (it has {sorted(source)})")
    return {"layers": {n: source[i] for n, i in enumerate(layers)}, "norm": params["norm"]}


def _key_axis(x: jax.Array | None) -> jax.Array | None:
    """Per-key `[B, Nk]` (or `[Nk]`) -> broadcastable against logits `[B, H, Nq, Nk]`."""
    return None if x is None else jnp.expand_dims(x, (-2, -3))


class MemoryAttentionLayer(nnx.Module):
    """One pre-norm layer: RoPE self-attention, RoPE cross-attention to the memories, ReLU FFN."""

    def __init__(
        self,
        d_model: int,
        kv_dim: int,
        ffn_dim: int,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
    ):
        self.self_attn = Attention(d_model, num_heads, rngs=rngs, dtype=dtype)
        self.cross_attn_image = Attention(d_model, num_heads, kv_in_dim=kv_dim, rngs=rngs, dtype=dtype)
        self.linear1 = linear(d_model, ffn_dim, rngs=rngs, dtype=dtype)
        self.linear2 = linear(ffn_dim, d_model, rngs=rngs, dtype=dtype)
        self.norm1 = layer_norm(d_model, eps=LAYER_NORM_EPS, rngs=rngs, dtype=dtype)
        self.norm2 = layer_norm(d_model, eps=LAYER_NORM_EPS, rngs=rngs, dtype=dtype)
        self.norm3 = layer_norm(d_model, eps=LAYER_NORM_EPS, rngs=rngs, dtype=dtype)

    def __call__(
        self,
        x: jax.Array,
        memory: jax.Array,
        memory_pos: jax.Array,
        *,
        query_angles: jax.Array,
        key_angles: jax.Array,
        key_mask: jax.Array | None = None,
        kv_transform: KVTransform | None = None,
    ) -> jax.Array:
        """x `[B, Nq, C]`, memory and memory_pos `[B, Nk, Ckv]` -> `[B, Nq, C]`.

        query_angles `[Nq, Dh/2]`; key_angles `[Nk, Dh/2]` or `[B, Nk, Dh/2]`; key_mask `[B, Nk]`.
        """
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h, q_angles=query_angles, k_angles=query_angles)

        h = self.norm2(x)
        # Keys see the memory's positional term (added before k_proj); values never do.
        q, k, v = self.cross_attn_image.project_qkv(
            h, memory + memory_pos, memory, q_angles=query_angles, k_angles=key_angles
        )
        projected = ProjectedMemory(k, v, None, key_mask)
        if kv_transform is not None:
            projected = kv_transform(projected)
        x = x + self.cross_attn_image.attend_projected(
            q, projected.k, projected.v, bias=_key_axis(projected.bias), mask=_key_axis(projected.mask)
        )

        h = self.norm3(x)
        return x + self.linear2(jax.nn.relu(self.linear1(h)))


class MemoryAttention(nnx.Module):
    """SAM3's `transformer.encoder`: `num_layers` `MemoryAttentionLayer`s and a final LayerNorm."""

    def __init__(
        self,
        num_layers: int = 4,
        d_model: int = 256,
        kv_dim: int = 64,
        ffn_dim: int = 2048,
        num_heads: int = 1,
        rope_theta: float = 10000.0,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        remat: bool = False,
    ):
        self.head_dim = d_model // num_heads
        self.rope_theta = rope_theta
        self.remat = remat  # recompute each layer in the backward pass (gradient checkpointing)
        self.layers = nnx.List(
            [
                MemoryAttentionLayer(d_model, kv_dim, ffn_dim, num_heads, rngs=rngs, dtype=dtype)
                for _ in range(num_layers)
            ]
        )
        self.norm = layer_norm(d_model, eps=LAYER_NORM_EPS, rngs=rngs, dtype=dtype)

    def __call__(
        self,
        src: jax.Array,
        src_pos: jax.Array,
        memory: jax.Array,
        memory_pos: jax.Array,
        *,
        query_grid: tuple[int, int],
        key_angles: jax.Array,
        key_mask: jax.Array | None = None,
        kv_transform: KVTransform | None = None,
    ) -> jax.Array:
        """Memory-conditioned features of the current frame.

        src, src_pos: `[B, Nq, C]`, the frame's tokens (row-major on `query_grid = (H, W)`, Nq = H·W)
        and their sine encoding. memory, memory_pos: `[B, Nk, Ckv]`. key_angles: `[Nk, Dh/2]` or
        `[B, Nk, Dh/2]` (see `MemoryPath.key_angles`). key_mask: `[B, Nk]` bool, False = the slot is
        ignored exactly; a query row needs at least one valid key. kv_transform: applied to the
        projected, rotated memory in every layer. Returns `[B, Nq, C]`.
        """
        grid_h, grid_w = query_grid
        if grid_h * grid_w != src.shape[1]:
            raise ValueError(f"query_grid {query_grid} does not hold the {src.shape[1]} query tokens")
        if key_angles.shape[-2] != memory.shape[1]:
            raise ValueError(
                f"key_angles has {key_angles.shape[-2]} rows for {memory.shape[1]} memory tokens"
            )
        query_angles = axial_angles(grid_positions(grid_h, grid_w), self.head_dim, self.rope_theta)
        x = src + INPUT_POS_WEIGHT * src_pos
        for layer in self.layers:
            x = call_layer(
                layer,
                x,
                memory,
                memory_pos,
                remat=self.remat,
                query_angles=query_angles,
                key_angles=key_angles,
                key_mask=key_mask,
                kv_transform=kv_transform,
            )
        return self.norm(x)
