"""The tracker neck: the `sam2_convs` branch of SAM3's dual ViTDet neck, levels 0-2.

Upstream computes a fourth level (stride 28, max-pooled) that the tracker discards
(`scalp=1`), so it is not built here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from es3_jax.nn.layers import ConvTranspose2x2, Dtype, conv, gelu
from es3_jax.nn.position_encoding import sine_2d

SCALES = (4, 2, 1)


class NeckLevel(nnx.Module):
    """One simple-FPN level: up-sample by `scale` with 2×2 transposed convs, then 1×1 and 3×3 convs.

    Scale 4 is ConvT(in→in/2), GELU, ConvT(in/2→in/4); scale 2 is one ConvT(in→in/2);
    scale 1 has no up-sampling. There is no activation between `conv_1x1` and `conv_3x3`.
    """

    def __init__(self, in_dim: int, d_model: int, scale: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        if scale == 4:
            self.dconv_2x2_0 = ConvTranspose2x2(in_dim, in_dim // 2, rngs=rngs, dtype=dtype)
            self.dconv_2x2_1 = ConvTranspose2x2(in_dim // 2, in_dim // 4, rngs=rngs, dtype=dtype)
            out_dim = in_dim // 4
        elif scale == 2:
            self.dconv_2x2 = ConvTranspose2x2(in_dim, in_dim // 2, rngs=rngs, dtype=dtype)
            out_dim = in_dim // 2
        elif scale == 1:
            out_dim = in_dim
        else:
            raise ValueError(f"unsupported neck scale {scale}; expected one of {SCALES}")
        self.scale = scale
        self.conv_1x1 = conv(out_dim, d_model, 1, rngs=rngs, dtype=dtype)
        self.conv_3x3 = conv(d_model, d_model, 3, padding=1, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, in_dim]` -> `[B, scale·H, scale·W, d_model]`."""
        if self.scale == 4:
            x = self.dconv_2x2_1(gelu(self.dconv_2x2_0(x)))
        elif self.scale == 2:
            x = self.dconv_2x2(x)
        return self.conv_3x3(self.conv_1x1(x))


class TrackerNeck(nnx.Module):
    """Trunk features -> the tracker's three feature levels (strides 14/4, 14/2, 14) and their sine PEs."""

    def __init__(self, in_dim: int = 1024, d_model: int = 256, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        self.levels = nnx.List([NeckLevel(in_dim, d_model, s, rngs=rngs, dtype=dtype) for s in SCALES])

    def __call__(self, x: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
        """x: `[B, H, W, in_dim]` -> (features, pos), each a list over levels 0..2.

        features[i], pos[i]: `[B, s·H, s·W, d_model]` for s = 4, 2, 1. The position encodings are
        the constant 256-channel sine table of each grid, in the features' dtype (as upstream).
        """
        features, pos = [], []
        for level in self.levels:
            y = level(x)
            b, h, w, d = y.shape
            features.append(y)
            pos.append(jnp.broadcast_to(sine_2d(h, w, d).astype(y.dtype), (b, h, w, d)))
        return features, pos
