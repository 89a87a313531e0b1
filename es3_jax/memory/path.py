"""The memory path of a tracking step: what a memory frame becomes in the bank, and how the current
frame reads the bank.

One class serves the teacher and the student. The teacher's path (`SAM3Tracker.memory_path()`)
keeps each frame's `H·W` memory as it is and attends with SAM3's memory attention; the student
(`es3_jax.models.student.student_from_config`) compresses each frame with a Perceiver Resampler
and attends with fewer, pooled layers:

* `compress` turns each encoded memory frame into `num_latents + g²` perceiver tokens, or keeps
  the raw `H·W` tokens when there is no perceiver;
* `__call__` conditions the current frame on a fixed-size bank of such frames plus object
  pointers. Keys are rotated (RoPE) at their place in the query frame: raw tokens at their grid
  position (upstream `rope_k_repeat`), 2-D latents at the centre of their window, global latents
  and pointers not at all. Spatial tokens are pooled p×p with the Eq. 5 log(p²) compensation: the
  2-D latent grid when the perceiver is on, the raw grid otherwise; global latents and pointers
  never.

The tracking step (`es3_jax.models.tracker`) only ever calls `compress` when it encodes a memory
frame and `__call__` when it conditions a frame; it never looks inside.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from es3_jax.config import TrackerConfig
from es3_jax.memory.attention import MemoryAttention, pooled_memory
from es3_jax.memory.perceiver import PerceiverResampler
from es3_jax.nn.rope import axial_angles, grid_positions


class MemoryPath(nnx.Module):
    """A `memory_attention` of any depth with an optional `spatial_perceiver` and p×p pooling.

    Without a perceiver and with `pool_size` 1 this is the teacher's path.
    """

    def __init__(
        self,
        memory_attention: MemoryAttention,
        spatial_perceiver: PerceiverResampler | None = None,
        *,
        pool_size: int = 1,
    ):
        if pool_size < 1:
            raise ValueError(f"pool_size={pool_size} must be at least 1")
        if spatial_perceiver is not None and spatial_perceiver.grid % pool_size:
            raise ValueError(
                f"pool size {pool_size} does not divide the {spatial_perceiver.grid}² grid of 2-D latents"
            )
        self.memory_attention = memory_attention
        self.spatial_perceiver = spatial_perceiver
        self.pool_size = pool_size

    def compress(self, features: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One memory frame `[B, H, W, Cm]` and its sine encoding -> tokens and positions `[B, N, Cm]`.

        N = num_latents + g² with the perceiver, H·W (row-major) without. The positions do not
        depend on the frame's content (the bank keeps one copy of them).
        """
        if self.spatial_perceiver is not None:
            return self.spatial_perceiver(features, pos)
        b, h, w, c = features.shape
        return features.reshape(b, h * w, c), pos.reshape(b, h * w, c)

    def frame_layout(self, query_grid: tuple[int, int]) -> tuple[int, tuple[int, int]]:
        """(unrotated, unpooled prefix tokens per frame, grid of the frame's spatial tokens)."""
        if self.spatial_perceiver is None:
            return 0, query_grid
        g = self.spatial_perceiver.grid
        return self.spatial_perceiver.latents.shape[0], (g, g)

    def frame_key_angles(self, query_grid: tuple[int, int]) -> jax.Array:
        """RoPE angles of one stored frame's tokens -> `[N, Dh/2]`.

        A 2-D latent sits at the centre of its window, mapped to query-grid coordinates with
        half-pixel centres (window (0, 0) of a 16×16 grid over a 72×72 frame: (1.75, 1.75)).
        """
        head_dim, theta = self.memory_attention.head_dim, self.memory_attention.rope_theta
        prefix, (gh, gw) = self.frame_layout(query_grid)
        qh, qw = query_grid
        pos = grid_positions(gh, gw)
        if self.spatial_perceiver is not None:
            scale = jnp.array([qw / gw, qh / gh], jnp.float32)
            pos = (pos + 0.5) * scale - 0.5
        angles = axial_angles(pos, head_dim, theta)
        return jnp.concatenate([jnp.zeros((prefix, head_dim // 2), jnp.float32), angles])

    def key_angles(self, query_grid: tuple[int, int], num_frames: int, num_pointer_tokens: int) -> jax.Array:
        """RoPE angles of a bank read: `num_frames` stored frames, then the pointer tokens (angle 0,
        not rotated) -> `[num_frames·N + num_pointer_tokens, Dh/2]`."""
        frame = self.frame_key_angles(query_grid)
        pointers = jnp.zeros((num_pointer_tokens, frame.shape[1]), jnp.float32)
        return jnp.concatenate([jnp.tile(frame, (num_frames, 1)), pointers])

    def __call__(
        self,
        src: jax.Array,
        src_pos: jax.Array,
        *,
        query_grid: tuple[int, int],
        frames: jax.Array,
        frames_pos: jax.Array,
        frame_valid: jax.Array,
        pointers: jax.Array,
        pointers_pos: jax.Array,
        pointer_valid: jax.Array,
    ) -> jax.Array:
        """Memory-conditioned features of the current frame -> `[B, Nq, C]`.

        src, src_pos `[B, Nq, C]` on `query_grid` (Nq = H·W); frames, frames_pos `[B, S, N, Cm]`
        (as made by `compress`, positions including the temporal encoding); frame_valid `[B, S]`;
        pointers, pointers_pos `[B, P, Cm]` (object-pointer tokens with their temporal encoding);
        pointer_valid `[B, P]`. Invalid slots are masked exactly.
        """
        b, s, n, c = frames.shape
        p = pointers.shape[1]
        angles = self.key_angles(query_grid, s, p)
        if angles.shape[0] != s * n + p:
            per_frame = (angles.shape[0] - p) // s
            raise ValueError(f"memory frames hold {n} tokens; this memory path stores {per_frame}")
        memory = jnp.concatenate([frames.reshape(b, s * n, c), pointers.astype(frames.dtype)], axis=1)
        memory_pos = jnp.concatenate(
            [frames_pos.reshape(b, s * n, c), pointers_pos.astype(frames_pos.dtype)], axis=1
        )
        key_mask = jnp.concatenate(
            [jnp.repeat(frame_valid.astype(bool), n, axis=1), pointer_valid.astype(bool)], axis=1
        )
        prefix, grid = self.frame_layout(query_grid)
        return self.memory_attention(
            src,
            src_pos,
            memory,
            memory_pos,
            query_grid=query_grid,
            key_angles=angles,
            key_mask=key_mask,
            kv_transform=pooled_memory(s, prefix, grid, self.pool_size),
        )


def memory_tokens(memory: MemoryPath, t: TrackerConfig) -> tuple[int, int]:
    """(N, Cm) of one memory frame as the memory path `memory` stores it in a bank."""
    raw = jax.ShapeDtypeStruct((1, t.grid, t.grid, t.MEM_DIM), jnp.float32)
    tokens, _ = jax.eval_shape(memory.compress, raw, raw)
    return tokens.shape[1], tokens.shape[2]
