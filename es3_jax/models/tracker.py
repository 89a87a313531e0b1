"""The SAM3 video tracker's frozen parts as one NNX module tree.

Component attribute names are the es3 parameter prefixes of the key tables in
`porting/keymap.py` (`neck`, `memory_encoder`, `memory_attention`, `prompt_encoder`,
`mask_decoder`), and the tracker-level learned tensors keep their upstream names.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
from flax import nnx

from es3_jax.config import TrackerConfig
from es3_jax.models.memory_attention import MemoryAttention
from es3_jax.models.memory_encoder import MemoryEncoder
from es3_jax.models.neck import TrackerNeck
from es3_jax.models.sam_heads import (
    MaskDecoder,
    PromptEncoder,
    mask_downsample_conv,
    object_pointer_mlp,
    object_pointer_tpos_linear,
)
from es3_jax.nn.layers import Dtype
from es3_jax.params import abstract_shapes, bind


class SAM3Tracker(nnx.Module):
    """Neck, memory encoder, memory attention, prompt encoder, mask decoder and the tracker's
    own parameters (object-pointer heads and learned embeddings).

    Learned embeddings keep the upstream shapes: `maskmem_tpos_enc [num_maskmem, 1, 1, mem_dim]`,
    `no_mem_embed [1, 1, d]`, `no_obj_ptr [1, d]`, `no_obj_embed_spatial [1, mem_dim]`.
    """

    def __init__(self, cfg: TrackerConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        d, mem = cfg.D_MODEL, cfg.MEM_DIM
        self.neck = TrackerNeck(cfg.TRUNK_DIM, d, rngs=rngs, dtype=dtype)
        self.memory_encoder = MemoryEncoder(d, mem, rngs=rngs, dtype=dtype)
        self.memory_attention = MemoryAttention(
            cfg.MEMORY_ATTENTION_LAYERS,
            d,
            mem,
            cfg.MEMORY_ATTENTION_FFN_DIM,
            cfg.MEMORY_ATTENTION_HEADS,
            cfg.ROPE_THETA,
            rngs=rngs,
            dtype=dtype,
        )
        self.prompt_encoder = PromptEncoder(
            d, cfg.IMAGE_SIZE, cfg.grid, cfg.MASK_IN_CHANS, rngs=rngs, dtype=dtype
        )
        self.mask_decoder = MaskDecoder(
            d,
            cfg.NUM_MULTIMASK_OUTPUTS,
            cfg.DECODER_DEPTH,
            cfg.DECODER_HEADS,
            cfg.DECODER_MLP_DIM,
            rngs=rngs,
            stability_delta=cfg.DYNAMIC_MULTIMASK_STABILITY_DELTA,
            stability_thresh=cfg.DYNAMIC_MULTIMASK_STABILITY_THRESH,
            dtype=dtype,
        )
        self.mask_downsample = mask_downsample_conv(rngs=rngs, dtype=dtype)
        self.obj_ptr_proj = object_pointer_mlp(d, rngs=rngs, dtype=dtype)
        self.obj_ptr_tpos_proj = object_pointer_tpos_linear(d, mem, rngs=rngs, dtype=dtype)
        normal = nnx.initializers.normal(0.02)
        self.maskmem_tpos_enc = nnx.Param(normal(rngs.params(), (cfg.NUM_MASKMEM, 1, 1, mem), jnp.float32))
        self.no_mem_embed = nnx.Param(normal(rngs.params(), (1, 1, d), jnp.float32))
        self.no_obj_ptr = nnx.Param(normal(rngs.params(), (1, d), jnp.float32))
        self.no_obj_embed_spatial = nnx.Param(normal(rngs.params(), (1, mem), jnp.float32))


def expected_param_shapes(cfg: TrackerConfig) -> dict[str, tuple[int, ...]]:
    """`{es3 path: shape}` of every tracker parameter, computed without allocating any."""
    return abstract_shapes(lambda: SAM3Tracker(cfg, rngs=nnx.Rngs(0)))


def build_tracker(
    cfg: TrackerConfig, params: Mapping, *, dtype: Dtype = jnp.float32, source: str = ""
) -> SAM3Tracker:
    """A `SAM3Tracker` holding `params` (nested dict, e.g. from `tracker_weights.load`), strictly."""
    return bind(lambda: SAM3Tracker(cfg, rngs=nnx.Rngs(0), dtype=dtype), params, source)
