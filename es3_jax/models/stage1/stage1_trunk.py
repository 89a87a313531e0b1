"""A stage-1 student trunk: a small backbone, then the head that reproduces SAM3's ViT features.

Upstream (`stage1/model.py`, `ImageStudentEncoder`): the backbone's stride-32 map `[C, S/32, S/32]`
goes through `Conv2d(C, D, 1, bias=False)`, `BatchNorm2d(D)`, exact GELU, `Conv2d(D, D, 3,
padding=1)`, then a bilinear resize (half-pixel centres) to the ViT's grid: at 1008 px, 32×32 ->
72×72 with D = 1024. The result stands in for the ViT's output everywhere after it (neck, store,
tracker).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from es3_jax.config import STAGE1_TRUNK_KINDS
from es3_jax.models.stage1.efficientvit import EfficientViT
from es3_jax.models.stage1.repvit import RepViT
from es3_jax.models.stage1.tiny_vit import TinyViT
from es3_jax.nn.layers import Activation, BatchNorm, Dtype, conv, gelu, resize_bilinear

HEAD_BN_EPS = 1e-5  # torch nn.BatchNorm2d default

FAMILIES: dict[str, type[nnx.Module]] = {"repvit": RepViT, "tiny_vit": TinyViT, "efficientvit": EfficientViT}


def family_of(kind: str) -> type[nnx.Module]:
    """The backbone class of a stage-1 kind (`repvit_m1_1` -> `RepViT`)."""
    for prefix, family in FAMILIES.items():
        if kind in STAGE1_TRUNK_KINDS and kind.startswith(prefix + "_"):
            return family
    raise ValueError(f"unknown stage-1 trunk kind {kind!r}; known: {', '.join(STAGE1_TRUNK_KINDS)}")


class Stage1Trunk(nnx.Module):
    """Parameter paths: `backbone.*` (the family module's, upstream's `backbone.model.*`) and
    `head.{0,1,3}.*` (upstream's `head` Sequential, same indices)."""

    def __init__(
        self,
        kind: str,
        image_size: int,
        grid: int,
        out_dim: int,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
    ):
        self.kind = kind
        self.image_size = image_size
        self.grid = grid
        self.dtype = dtype
        self.backbone = family_of(kind)(kind, image_size, rngs=rngs, dtype=dtype)
        c = self.backbone.out_channels
        self.head = nnx.List(
            [
                conv(c, out_dim, 1, use_bias=False, rngs=rngs, dtype=dtype),
                BatchNorm(out_dim, eps=HEAD_BN_EPS, rngs=rngs, dtype=dtype),
                Activation(gelu),
                conv(out_dim, out_dim, 3, padding=1, rngs=rngs, dtype=dtype),
            ]
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        """images `[B, S, S, 3]` float, already normalised -> `[B, grid, grid, out_dim]` float32."""
        if images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"trunk {self.kind} expects images [B, {self.image_size}, {self.image_size}, 3], got {images.shape}"
            )
        return self.project(self.backbone(images.astype(self.dtype)))

    def project(self, features: jax.Array) -> jax.Array:
        """The head: the backbone's map `[B, h, w, C]` -> `[B, grid, grid, out_dim]` float32."""
        x = features
        for layer in self.head:
            x = layer(x)
        x = x.astype(jnp.float32)
        if x.shape[1:3] != (self.grid, self.grid):
            x = resize_bilinear(x, self.grid, self.grid)
        return x
