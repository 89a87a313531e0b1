"""The memory path of a tracking step: what a memory frame becomes in the bank, and how the
current frame reads the bank.

The tracking step (`es3_jax.models.tracker`) only ever calls `compress` when it encodes a
memory frame and `__call__` when it conditions a frame; it never looks inside. The teacher's
path (`RawMemory`) keeps each frame's 72×72 memory as it is; the student (`StudentMemory` in
`es3_jax.models.student`) compresses it and attends with fewer, pooled layers.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

from es3_jax.models.memory_attention import MemoryAttention, memory_key_angles


class MemoryPath(Protocol):
    def compress(self, features: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One encoded memory frame -> the tokens the bank stores.

        features, pos: `[B, H, W, Cm]` (memory-encoder output and its sine encoding) -> tokens,
        tokens_pos: `[B, N, Cm]`. tokens_pos must not depend on the frame's content (the bank
        keeps one copy of it).
        """
        ...

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
        """Memory-conditioned features of the current frame.

        src, src_pos `[B, Nq, C]` (Nq = H·W of query_grid); frames, frames_pos `[B, S, N, Cm]`
        (frames_pos includes the temporal encoding); frame_valid `[B, S]` bool; pointers,
        pointers_pos `[B, P, Cm]` (object-pointer tokens with their temporal encoding);
        pointer_valid `[B, P]` bool. Invalid slots are masked exactly. Returns `[B, Nq, C]`.
        """
        ...


class RawMemory:
    """The teacher's path: identity `compress`, SAM3's memory attention over the raw frames.

    Every slot is a full memory frame on the query grid, so its keys are rotated with the
    query grid's RoPE angles (upstream `rope_k_repeat`); pointer tokens are not rotated.
    Not an `nnx.Module` field of anything: it wraps the tracker's `memory_attention`.
    """

    def __init__(self, memory_attention: MemoryAttention):
        self.memory_attention = memory_attention

    def compress(self, features: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, h, w, c = features.shape
        return features.reshape(b, h * w, c), pos.reshape(b, h * w, c)

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
        b, s, n, c = frames.shape
        grid_h, grid_w = query_grid
        if n != grid_h * grid_w:
            raise ValueError(
                f"raw memory frames hold {n} tokens; the query grid {query_grid} has {grid_h * grid_w}"
            )
        num_ptr = pointers.shape[1]
        memory = jnp.concatenate([frames.reshape(b, s * n, c), pointers.astype(frames.dtype)], axis=1)
        memory_pos = jnp.concatenate(
            [frames_pos.reshape(b, s * n, c), pointers_pos.astype(frames_pos.dtype)], axis=1
        )
        key_mask = jnp.concatenate([jnp.repeat(frame_valid, n, axis=1), pointer_valid], axis=1)
        angles = memory_key_angles(
            grid_h, grid_w, s, num_ptr, self.memory_attention.head_dim, self.memory_attention.rope_theta
        )
        return self.memory_attention(
            src, src_pos, memory, memory_pos, query_grid=query_grid, key_angles=angles, key_mask=key_mask
        )
