"""TinyViT (5M / 11M / 21M) as EfficientSAM3's stage-1 student backbone, inference form.

Upstream: `sam3/sam3/backbones/tiny_vit.py` (Microsoft's TinyViT), built by `stage1/model.py`
`_build_backbone` with `img_size = S` and run by `TinyViTAdapter`: `patch_embed`, then
`layers[0..3]`, the last tokens reshaped to the stride-32 map (no pooling, no `norm_head`).

* `patch_embed`: two 3×3 stride-2 conv+BN with an exact GELU between: `[B, S, S, 3]` ->
  `[B, S/4, S/4, C0]`.
* `layers.0`: MBConv blocks (1×1 expand ×4, GELU, 3×3 depthwise, GELU, 1×1 project, + input, GELU).
* `layers.1..3`: TinyViT blocks: windowed attention with a learned relative-position bias per head
  (one value per |dy|, |dx| offset inside the window), + input; a 3×3 depthwise conv+BN (no
  residual); a pre-norm MLP, + input.
* Each `layers.i` (i < 3) ends with the `downsample` (PatchMerging: 1×1 conv, GELU, 3×3 stride-2
  depthwise conv, GELU, 1×1 conv; every conv with a BN) into the next width. Upstream's names put it
  at the end of the earlier layer (timm puts it at the start of the next stage); paths here follow
  upstream.

At 1008 px the grids are 252, 126, 63, 32 with windows 7, 7, 14, 7: 63 and 32 are padded (bottom,
right) with zero tokens to 70 and 35. The zeros are padded *before* the attention's LayerNorm (it
sits inside the attention), so each pad token enters as the LayerNorm's bias; they are not masked:
real tokens attend to them. Then they are cropped away.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from es3_jax.nn.attention import attend
from es3_jax.nn.layers import Activation, ConvBN, Dtype, gelu, layer_norm, linear

LN_EPS = 1e-5  # torch nn.LayerNorm default


@dataclass(frozen=True)
class TinyViTVariant:
    """Hyper-parameters of one TinyViT size (upstream's `tiny_vit_*_224` builders)."""

    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]  # [0] unused: layers.0 (MBConv) has no attention
    window_sizes: tuple[int, int, int, int]
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3


VARIANTS: dict[str, TinyViTVariant] = {
    "tiny_vit_5m": TinyViTVariant((64, 128, 160, 320), (2, 2, 6, 2), (2, 4, 5, 10), (7, 7, 14, 7)),
    "tiny_vit_11m": TinyViTVariant((64, 128, 256, 448), (2, 2, 6, 2), (2, 4, 8, 14), (7, 7, 14, 7)),
    "tiny_vit_21m": TinyViTVariant((96, 192, 384, 576), (2, 2, 6, 2), (3, 6, 12, 18), (7, 7, 14, 7)),
}


def layer_resolutions(image_size: int, num_layers: int = 4) -> tuple[int, ...]:
    """Upstream's fixed token grid side of each layer for `img_size = image_size`: S // 4, then each
    stride-2 PatchMerging `(r - 1) // 2 + 1` (1008 -> 252, 126, 63, 32)."""
    res = [image_size // 4]
    for _ in range(num_layers - 1):
        res.append((res[-1] - 1) // 2 + 1)
    return tuple(res)


def attention_bias_idxs(window_size: int) -> np.ndarray:
    """`[N, N]` int (N = window²): the column of `attention_biases` for each query/key pair.

    Upstream numbers the offsets (|dy|, |dx|) in order of first appearance over row-major query and
    key positions; the first query, (0, 0), already meets every offset in row-major order, so the
    number of (|dy|, |dx|) is `|dy| * window + |dx|`.
    """
    ys, xs = np.divmod(np.arange(window_size * window_size), window_size)
    dy = np.abs(ys[:, None] - ys[None, :])
    dx = np.abs(xs[:, None] - xs[None, :])
    return dy * window_size + dx


class PatchEmbed(nnx.Module):
    """`seq`: conv+BN 3×3 stride 2, GELU, conv+BN 3×3 stride 2 (indices 0, 1, 2 as upstream)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        self.seq = nnx.List(
            [
                ConvBN(3, dim // 2, 3, stride=2, rngs=rngs, dtype=dtype),
                Activation(gelu),
                ConvBN(dim // 2, dim, 3, stride=2, rngs=rngs, dtype=dtype),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, S, S, 3]` -> `[B, ceil(S/4), ceil(S/4), dim]`."""
        for layer in self.seq:
            x = layer(x)
        return x


class MBConv(nnx.Module):
    def __init__(self, dim: int, expand_ratio: float, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden, rngs=rngs, dtype=dtype)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden, rngs=rngs, dtype=dtype)
        self.conv3 = ConvBN(hidden, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, dim]` -> `[B, H, W, dim]`; the last GELU comes after the residual sum."""
        y = self.conv3(gelu(self.conv2(gelu(self.conv1(x)))))
        return gelu(x + y)


class PatchMerging(nnx.Module):
    def __init__(self, dim: int, out_dim: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        self.conv1 = ConvBN(dim, out_dim, rngs=rngs, dtype=dtype)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride=2, groups=out_dim, rngs=rngs, dtype=dtype)
        self.conv3 = ConvBN(out_dim, out_dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, dim]` -> `[B, ceil(H/2), ceil(W/2), out_dim]`."""
        return self.conv3(gelu(self.conv2(gelu(self.conv1(x)))))


class Attention(nnx.Module):
    """Pre-normed multi-head attention over one window's tokens, with a relative-position bias.

    `qkv`'s output channels are grouped by head, each head's as q | k | v (upstream views them as
    `[N, heads, 3 * head_dim]` and splits the last axis), unlike the q | k | v-then-heads of ViTs.
    `attention_biases` `[heads, window²]` holds one logit offset per (|dy|, |dx|).
    """

    def __init__(
        self, dim: int, num_heads: int, window_size: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32
    ):
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.norm = layer_norm(dim, eps=LN_EPS, rngs=rngs, dtype=dtype)
        self.qkv = linear(dim, 3 * dim, rngs=rngs, dtype=dtype)
        self.proj = linear(dim, dim, rngs=rngs, dtype=dtype)
        self.attention_biases = nnx.Param(jnp.zeros((num_heads, window_size * window_size), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, window², dim]` (B counts windows) -> `[B, window², dim]`."""
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        bias = self.attention_biases[...][:, attention_bias_idxs(self.window_size)]  # [heads, N, N]
        out = attend(q, k, v, bias=bias[None])
        return self.proj(out.reshape(b, n, c))


class Mlp(nnx.Module):
    """Upstream's `Mlp` with its own pre-norm: `norm`, `fc1`, GELU, `fc2`."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        self.norm = layer_norm(dim, eps=LN_EPS, rngs=rngs, dtype=dtype)
        self.fc1 = linear(dim, hidden, rngs=rngs, dtype=dtype)
        self.fc2 = linear(hidden, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nnx.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
    ):
        if dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide dim {dim}")
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size, rngs=rngs, dtype=dtype)
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, dim]` -> `[B, H, W, dim]`."""
        x = x + self._windowed_attention(x)
        x = self.local_conv(x)
        return x + self.mlp(x)

    def _windowed_attention(self, x: jax.Array) -> jax.Array:
        """Attention inside non-overlapping `ws × ws` windows of `[B, H, W, C]`.

        As upstream, the grid is zero-padded at the bottom/right to a multiple of `ws` before the
        attention's norm, every padded token takes part (unmasked), and the result is cropped back.
        A grid of exactly one window (upstream's short-cut) is the same computation.
        """
        ws = self.window_size
        b, h, w, c = x.shape
        ph, pw = -h % ws, -w % ws
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
        nh, nw = (h + ph) // ws, (w + pw) // ws
        windows = x.reshape(b, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, ws * ws, c)
        out = self.attn(windows)
        out = out.reshape(b, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, nh * ws, nw * ws, c)
        return out[:, :h, :w]


class ConvLayer(nnx.Module):
    """`layers.0`: MBConv `blocks`, then `downsample` into the next width."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        expand_ratio: float,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
    ):
        self.blocks = nnx.List([MBConv(dim, expand_ratio, rngs=rngs, dtype=dtype) for _ in range(depth)])
        self.downsample = PatchMerging(dim, out_dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, dim]` -> `[B, ceil(H/2), ceil(W/2), out_dim]`."""
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class BasicLayer(nnx.Module):
    """`layers.1..3`: TinyViT `blocks`, then (except in the last layer) `downsample`."""

    def __init__(
        self,
        dim: int,
        out_dim: int | None,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
    ):
        self.blocks = nnx.List(
            [
                TinyViTBlock(dim, num_heads, window_size, mlp_ratio, local_conv_size, rngs=rngs, dtype=dtype)
                for _ in range(depth)
            ]
        )
        self.downsample = None if out_dim is None else PatchMerging(dim, out_dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, dim]` -> `[B, ceil(H/2), ceil(W/2), out_dim]`, or `[B, H, W, dim]` in the last layer."""
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nnx.Module):
    """EfficientSAM3's TinyViT student backbone. Parameter paths are upstream's (`patch_embed.seq.0.c`,
    `layers.{i}.blocks.{j}.attn.qkv`, `layers.{i}.downsample.conv2.bn`, ...).

    Upstream fixes every layer's grid from `img_size` (`layer_resolutions`); this module takes the
    grid from its input, which is the same wherever upstream runs. An `image_size` whose real conv
    grids differ from upstream's fixed ones (S not a multiple of 4 with S // 4 even, e.g. 1009) is
    one upstream cannot run either, and is refused.
    """

    def __init__(self, kind: str, image_size: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        if kind not in VARIANTS:
            raise ValueError(f"unknown TinyViT kind {kind!r}; known: {', '.join(VARIANTS)}")
        v = VARIANTS[kind]
        actual = -(-image_size // 4)  # two stride-2, pad-1, 3×3 convs: ceil twice
        if image_size < 4 or (actual + 1) // 2 != (image_size // 4 + 1) // 2:
            raise ValueError(
                f"TinyViT at image_size {image_size}: the patch grid {actual} does not halve to upstream's "
                f"fixed layer grids {layer_resolutions(image_size)}; use a multiple of 4"
            )
        self.kind = kind
        self.image_size = image_size
        self.dtype = dtype
        self.out_channels = v.embed_dims[-1]
        dims = v.embed_dims
        self.patch_embed = PatchEmbed(dims[0], rngs=rngs, dtype=dtype)
        layers: list[nnx.Module] = [
            ConvLayer(dims[0], dims[1], v.depths[0], v.mbconv_expand_ratio, rngs=rngs, dtype=dtype)
        ]
        for i in range(1, len(dims)):
            layers.append(
                BasicLayer(
                    dims[i],
                    dims[i + 1] if i + 1 < len(dims) else None,
                    v.depths[i],
                    v.num_heads[i],
                    v.window_sizes[i],
                    v.mlp_ratio,
                    v.local_conv_size,
                    rngs=rngs,
                    dtype=dtype,
                )
            )
        self.layers = nnx.List(layers)

    @property
    def feature_size(self) -> int:
        """Side of the output map (32 at 1008 px; `ceil(S / 32)` when S is a multiple of 4)."""
        return layer_resolutions(self.image_size)[-1]

    def __call__(self, images: jax.Array) -> jax.Array:
        """images `[B, S, S, 3]` float, already normalised (S = image_size) ->
        `[B, feature_size, feature_size, out_channels]` float32."""
        if images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"TinyViT expects images [B, {self.image_size}, {self.image_size}, 3], got {images.shape}"
            )
        x = self.patch_embed(images.astype(self.dtype))
        for layer in self.layers:
            x = layer(x)
        return x.astype(jnp.float32)
