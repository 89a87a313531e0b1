"""The student memory path: Perceiver-compressed memories and a shallow, pooled memory attention.

`StudentMemory` implements the tracker's `MemoryPath` protocol (see `memory_path.py`):

* `compress` turns each encoded memory frame into `num_latents + g²` perceiver tokens (DESIGN.md
  D5), or keeps the raw `H·W` tokens when the perceiver is off;
* `__call__` conditions the current frame on a fixed-size bank of such frames plus object
  pointers. Keys are rotated (RoPE) at their place in the query frame: raw tokens at their grid
  position, 2-D latents at the centre of their window, global latents and pointers not at all.
  Spatial tokens are pooled p×p with the Eq. 5 log(p²) compensation (D4): the 2-D latent grid
  when the perceiver is on, the raw grid otherwise; global latents and pointers never.

With the perceiver off, pooling 1 and the teacher's layers this is exactly the teacher's path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from es3_jax.config import Config, ConfigError
from es3_jax.models.memory_attention import MemoryAttention, pooled_memory, select_layers
from es3_jax.models.perceiver import PerceiverResampler, latent_grid
from es3_jax.nn.layers import Dtype
from es3_jax.nn.rope import axial_angles, grid_positions
from es3_jax.params import bind, param_dict


class StudentMemory(nnx.Module):
    """A memory path with an optional `spatial_perceiver` and a `memory_attention` of any depth."""

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

        N = num_latents + g² with the perceiver, H·W (row-major) without.
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

        src, src_pos `[B, Nq, C]` on `query_grid`; frames, frames_pos `[B, S, N, Cm]` (as made by
        `compress`, positions including the temporal encoding); frame_valid `[B, S]`; pointers,
        pointers_pos `[B, P, Cm]` (pointer tokens); pointer_valid `[B, P]`. Invalid slots are
        masked exactly.
        """
        b, s, n, c = frames.shape
        frame_angles = self.frame_key_angles(query_grid)
        if frame_angles.shape[0] != n:
            raise ValueError(f"memory frames hold {n} tokens; this student stores {frame_angles.shape[0]}")
        p = pointers.shape[1]
        memory = jnp.concatenate([frames.reshape(b, s * n, c), pointers.astype(frames.dtype)], axis=1)
        memory_pos = jnp.concatenate(
            [frames_pos.reshape(b, s * n, c), pointers_pos.astype(frames_pos.dtype)], axis=1
        )
        key_mask = jnp.concatenate(
            [jnp.repeat(frame_valid.astype(bool), n, axis=1), pointer_valid.astype(bool)], axis=1
        )
        head_dim = self.memory_attention.head_dim
        key_angles = jnp.concatenate(
            [jnp.tile(frame_angles, (s, 1)), jnp.zeros((p, head_dim // 2), jnp.float32)]
        )
        prefix, grid = self.frame_layout(query_grid)
        return self.memory_attention(
            src,
            src_pos,
            memory,
            memory_pos,
            query_grid=query_grid,
            key_angles=key_angles,
            key_mask=key_mask,
            kv_transform=pooled_memory(s, prefix, grid, self.pool_size),
        )


def student_from_config(
    cfg: Config,
    params: dict | None = None,
    *,
    teacher_params: dict | None = None,
    seed: int = 0,
    dtype: Dtype = jnp.float32,
    remat: bool = False,
) -> StudentMemory:
    """The student of `cfg.MODEL` (PERCEIVER, MEMORY_ATTENTION; widths from TEACHER).

    params: the student's own parameters (`{"memory_attention": ..., "spatial_perceiver": ...}`),
    bound strictly; None draws fresh weights from `seed`. teacher_params: the teacher's
    `memory_attention` parameters; with `MODEL.MEMORY_ATTENTION.INIT_FROM_TEACHER_LAYERS` set,
    the fresh student's layers (and final norm) are copied from those teacher layers (D6).
    remat: recompute every memory-attention and perceiver layer in the backward pass.
    """
    t, pc, mc = cfg.MODEL.TEACHER, cfg.MODEL.PERCEIVER, cfg.MODEL.MEMORY_ATTENTION
    if pc.ENABLED:
        try:
            g = latent_grid(pc.NUM_LATENTS_2D)
        except ValueError as e:
            raise ConfigError(f"MODEL.PERCEIVER.NUM_LATENTS_2D: {e}") from e
        if g % mc.POOL_SIZE:
            raise ConfigError(
                f"MODEL.MEMORY_ATTENTION.POOL_SIZE {mc.POOL_SIZE} does not divide the {g}×{g} grid of "
                f"MODEL.PERCEIVER.NUM_LATENTS_2D {pc.NUM_LATENTS_2D}"
            )
    if mc.POOL_SIZE < 1:
        raise ConfigError(f"MODEL.MEMORY_ATTENTION.POOL_SIZE must be at least 1, got {mc.POOL_SIZE}")
    layers = mc.INIT_FROM_TEACHER_LAYERS
    if layers and len(layers) != mc.NUM_LAYERS:
        raise ConfigError(
            f"MODEL.MEMORY_ATTENTION.INIT_FROM_TEACHER_LAYERS {list(layers)} names {len(layers)} layers "
            f"for NUM_LAYERS {mc.NUM_LAYERS}"
        )

    def build() -> StudentMemory:
        rngs = nnx.Rngs(seed)
        attention = MemoryAttention(
            mc.NUM_LAYERS,
            t.D_MODEL,
            t.MEM_DIM,
            t.MEMORY_ATTENTION_FFN_DIM,
            t.MEMORY_ATTENTION_HEADS,
            t.ROPE_THETA,
            rngs=rngs,
            dtype=dtype,
            remat=remat,
        )
        perceiver = None
        if pc.ENABLED:
            perceiver = PerceiverResampler(
                t.MEM_DIM,
                pc.NUM_LATENTS,
                pc.NUM_LATENTS_2D,
                pc.DEPTH,
                pc.HEADS,
                pc.FF_MULT,
                pc.WINDOW_SIZE,
                rngs=rngs,
                dtype=dtype,
                remat=remat,
            )
        return StudentMemory(attention, perceiver, pool_size=mc.POOL_SIZE)

    if params is not None:
        return bind(build, params, "student memory")
    student = build()
    if teacher_params is not None and layers:
        fresh = param_dict(student)
        fresh["memory_attention"] = select_layers(teacher_params, layers)
        return bind(build, fresh, "student memory initialised from the teacher")
    return student
