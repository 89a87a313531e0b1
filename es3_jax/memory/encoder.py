"""The tracker's memory encoder (upstream `SimpleMaskEncoder`); `SAM3Tracker.encode_memory` runs it.

A frame's predicted mask is down-sampled 16× by strided convs, added to the projected
level-2 feature of the same frame, fused by two ConvNeXt blocks and projected to the
64-channel memory the memory attention reads.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from es3_jax.nn.layers import DepthwiseConv, Dtype, TapConv, gelu, layer_norm, linear, resize_bilinear
from es3_jax.nn.position_encoding import sine_2d

# Four stride-2 stages: the mask reaches the feature grid at 16× below its input size.
_STAGES = 4
_MASK_STRIDE = 2**_STAGES


class MaskDownSampler(nnx.Module):
    """Mask `[B, 16H, 16W, 1]` -> `[B, H, W, embed_dim]`.

    Each stage is a 3×3 stride-2 conv (pad 1) quadrupling the channels (1→4→16→64→256),
    LayerNorm2d (eps 1e-6) and GELU; a 1×1 conv then projects to `embed_dim`.
    """

    def __init__(self, embed_dim: int = 256, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        chans = [4**s for s in range(_STAGES + 1)]
        self.convs = nnx.List(
            [
                TapConv(cin, cout, 3, stride=2, padding=1, rngs=rngs, dtype=dtype)
                for cin, cout in itertools.pairwise(chans)
            ]
        )
        self.norms = nnx.List([layer_norm(c, eps=1e-6, rngs=rngs, dtype=dtype) for c in chans[1:]])
        self.proj = TapConv(chans[-1], embed_dim, 1, rngs=rngs, dtype=dtype)

    def __call__(self, mask: jax.Array, height: int, width: int) -> jax.Array:
        """mask: `[B, Hm, Wm, 1]` -> `[B, height, width, embed_dim]`.

        A mask not already `16·height × 16·width` is resized to it first (bilinear, half-pixel,
        antialiased when shrinking, in float32), as upstream does to 1152² for a 72² grid.
        """
        size = (_MASK_STRIDE * height, _MASK_STRIDE * width)
        if mask.shape[1:3] != size:
            mask = resize_bilinear(mask.astype(jnp.float32), *size, antialias=True)
        x = mask
        for conv_, norm in zip(self.convs, self.norms, strict=True):
            x = gelu(norm(conv_(x)))
        return self.proj(x)


class CXBlock(nnx.Module):
    """ConvNeXt block: depthwise 7×7 conv, LayerNorm2d, per-pixel MLP (×4, GELU), layer scale, residual."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        self.dwconv = DepthwiseConv(dim, 7, rngs=rngs, dtype=dtype)
        self.norm = layer_norm(dim, eps=1e-6, rngs=rngs, dtype=dtype)
        self.pwconv1 = linear(dim, 4 * dim, rngs=rngs, dtype=dtype)
        self.pwconv2 = linear(4 * dim, dim, rngs=rngs, dtype=dtype)
        self.gamma = nnx.Param(jnp.full((dim,), 1e-6, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, dim]` -> `[B, H, W, dim]`."""
        y = self.pwconv2(gelu(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.gamma[...].astype(y.dtype) * y


class Fuser(nnx.Module):
    """A stack of CXBlocks (no input projection, as in SAM3)."""

    def __init__(self, dim: int, num_layers: int = 2, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        self.layers = nnx.List([CXBlock(dim, rngs=rngs, dtype=dtype) for _ in range(num_layers)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nnx.Module):
    """Upstream `SimpleMaskEncoder`: (level-2 feature, mask) -> one memory frame and its sine PE."""

    def __init__(self, d_model: int = 256, mem_dim: int = 64, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        self.mask_downsampler = MaskDownSampler(d_model, rngs=rngs, dtype=dtype)
        self.pix_feat_proj = TapConv(d_model, d_model, 1, rngs=rngs, dtype=dtype)
        self.fuser = Fuser(d_model, 2, rngs=rngs, dtype=dtype)
        self.out_proj = TapConv(d_model, mem_dim, 1, rngs=rngs, dtype=dtype)

    def __call__(
        self, pix_feat: jax.Array, mask: jax.Array, skip_mask_sigmoid: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """pix_feat `[B, H, W, d_model]`, mask `[B, Hm, Wm, 1]` -> (features, pos), each `[B, H, W, mem_dim]`.

        The mask goes through a sigmoid unless `skip_mask_sigmoid` (the tracker passes masks
        already mapped to `20·m − 10`). `pos` is the constant sine table of the H×W grid.
        """
        if not skip_mask_sigmoid:
            mask = jax.nn.sigmoid(mask.astype(jnp.float32))
        _, h, w, _ = pix_feat.shape
        x = self.pix_feat_proj(pix_feat) + self.mask_downsampler(mask, h, w)
        x = self.out_proj(self.fuser(x))
        pos = jnp.broadcast_to(sine_2d(h, w, x.shape[-1]).astype(x.dtype), x.shape)
        return x, pos


def keep_top_object(masks: jax.Array) -> jax.Array:
    """Per pixel, only the highest-scoring object keeps its logit; the others are clamped to ≤ −10.

    masks: `[B, H, W, 1]` over the B objects of one frame (upstream `_apply_non_overlapping_constraints`).
    """
    top = jnp.argmax(masks, axis=0, keepdims=True)
    keep = top == jnp.arange(masks.shape[0])[:, None, None, None]
    return jnp.where(keep, masks, jnp.minimum(masks, -10.0))
