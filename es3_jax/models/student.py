"""The student's memory path, built from the config: a Perceiver Resampler that compresses each
memory frame and a shallow, pooled memory attention (`MODEL.PERCEIVER`, `MODEL.MEMORY_ATTENTION`;
the widths are the teacher's).

With the perceiver off, pooling 1 and the teacher's layers it is exactly the teacher's path.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from es3_jax.config import Config, ConfigError
from es3_jax.memory.attention import MemoryAttention, select_layers
from es3_jax.memory.path import MemoryPath
from es3_jax.memory.perceiver import PerceiverResampler, latent_grid
from es3_jax.nn.layers import Dtype
from es3_jax.params import bind, param_dict


def student_from_config(
    cfg: Config,
    params: dict | None = None,
    *,
    teacher_params: dict | None = None,
    seed: int = 0,
    dtype: Dtype = jnp.float32,
    remat: bool = False,
) -> MemoryPath:
    """The student of `cfg.MODEL` (PERCEIVER, MEMORY_ATTENTION; widths from TEACHER).

    params: the student's own parameters (`{"memory_attention": ..., "spatial_perceiver": ...}`),
    bound strictly; None draws fresh weights from `seed`. teacher_params: the teacher's
    `memory_attention` parameters; with `MODEL.MEMORY_ATTENTION.INIT_FROM_TEACHER_LAYERS` set,
    the fresh student's layers (and final norm) are copied from those teacher layers.
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

    def build() -> MemoryPath:
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
        return MemoryPath(attention, perceiver, pool_size=mc.POOL_SIZE)

    if params is not None:
        return bind(build, params, "student memory")
    student = build()
    if teacher_params is not None and layers:
        fresh = param_dict(student)
        fresh["memory_attention"] = select_layers(teacher_params, layers)
        return bind(build, fresh, "student memory initialised from the teacher")
    return student
