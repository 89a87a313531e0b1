"""RepViT (M0.9, M1.1, M2.3) as EfficientSAM3's stage-1 student trunk, in inference form.

Upstream: `sam3/backbones/repvit.py` (THU-MIG's RepViT), run by `stage1/model.py`'s `RepViTAdapter`,
which applies `model.features` in order and returns the stride-32 map. `features.0` is the stem
(3×3 stride-2 conv+BN, GELU, 3×3 stride-2 conv+BN); every later entry is one `RepViTBlock`:

* stride 1: `token_mixer = [RepVGGDW, SqueezeExcite | Identity]`, where `RepVGGDW(x) =
  BN(BN(dw3×3(x)) + dw1×1(x) + x)` (the training form, three branches: not fused here, so the
  arithmetic is the one upstream's eval mode does), then `channel_mixer = x + MLP(x)`;
* stride 2 (the first block of stages 2-4): `token_mixer = [dw3×3/2 + BN, Identity, 1×1 + BN]`
  (widening the channels), then the same residual MLP.

The MLP is 1×1 conv+BN (2× wider), GELU (exact: upstream's `use_hs` picks GELU both ways), 1×1
conv+BN. The squeeze-excite is timm's `SEModule`: spatial mean, 1×1 conv, ReLU, 1×1 conv,
sigmoid gate, with `make_divisible(C / 4, 8)` hidden channels. Every BatchNorm has eps 1e-5 and is
computed from its running statistics; drop-path never runs in eval mode.

Parameter paths mirror the upstream backbone's `state_dict()` keys (`features.N.*`), e.g.
`features.3.token_mixer.0.conv.c.kernel` is `features.3.token_mixer.0.conv.c.weight`; positions
without parameters (GELU, Identity) hold parameter-less modules so that indices line up.

Any input size works: every stride-2 conv has kernel 3 and padding 1, so a side S gives
ceil(S / 2) after each, and ceil(S / 32) at the end (32 at 1008 px).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from es3_jax.nn.layers import Activation, BatchNorm, ConvBN, DepthwiseConv, Dtype, conv, gelu, identity

BN_EPS = 1e-5  # torch nn.BatchNorm2d default; upstream never changes it
MLP_RATIO = 2  # upstream asserts hidden_dim == 2 * inp
SE_RATIO = 0.25
SE_DIVISOR = 8


@dataclass(frozen=True)
class RepViTVariant:
    """One upstream `cfgs` table, in short.

    `widths[i]`: channels of stage i (the stem ends at `widths[0]`). `blocks[i]`: stride-1 blocks of
    stage i, after the stem (stage 0) or after the stage's stride-2 block (stages 1-3). In each
    stage the stride-1 blocks alternate squeeze-excite on, off, on, ..., except that the last
    stride-1 block before a stride-2 block never has one (timm calls it the downsample's
    `pre_block`).
    """

    widths: tuple[int, int, int, int]
    blocks: tuple[int, int, int, int]

    def layers(self) -> list[tuple[int, int, int, bool]]:
        """`(din, dout, stride, use_se)` of every block, in `features` order from index 1."""
        out = []
        din = self.widths[0]
        for stage, (width, n) in enumerate(zip(self.widths, self.blocks, strict=True)):
            if stage > 0:
                out.append((din, width, 2, False))
            for j in range(n):
                before_downsample = j == n - 1 and stage < len(self.widths) - 1
                out.append((width, width, 1, j % 2 == 0 and not before_downsample))
            din = width
        return out


# Upstream's `cfgs` tables (checked entry by entry against `sam3/backbones/repvit.py`): `features`
# has 27, 25 and 55 entries; the stride-2 blocks are features 4, 8, 24 (M0.9), 4, 8, 22 (M1.1)
# and 8, 16, 52 (M2.3). timm's depths are `blocks` minus the pre-blocks: (2, 2, 14, 2),
# (2, 2, 12, 2), (6, 6, 34, 2).
VARIANTS: dict[str, RepViTVariant] = {
    "repvit_m0_9": RepViTVariant(widths=(48, 96, 192, 384), blocks=(3, 3, 15, 2)),
    "repvit_m1_1": RepViTVariant(widths=(64, 128, 256, 512), blocks=(3, 3, 13, 2)),
    "repvit_m2_3": RepViTVariant(widths=(80, 160, 320, 640), blocks=(7, 7, 35, 2)),
}


def se_channels(dim: int) -> int:
    """timm's `make_divisible(dim * 0.25, 8, round_limit=0)`: round to the nearest multiple of 8
    (halves up), at least 8; `round_limit=0` disables the +8 correction."""
    return max(SE_DIVISOR, int(dim * SE_RATIO + SE_DIVISOR / 2) // SE_DIVISOR * SE_DIVISOR)


def _run(layers: Iterable[nnx.Module], x: jax.Array) -> jax.Array:
    for layer in layers:
        x = layer(x)
    return x


class RepVGGDW(nnx.Module):
    """`BN(ConvBN_dw3×3(x) + dw1×1(x) + x)`, the three branches kept apart (upstream's unfused form)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        self.conv = ConvBN(dim, dim, 3, groups=dim, rngs=rngs, dtype=dtype)
        self.conv1 = DepthwiseConv(dim, 1, rngs=rngs, dtype=dtype)
        self.bn = BatchNorm(dim, eps=BN_EPS, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, dim]` -> `[B, H, W, dim]`."""
        return self.bn((self.conv(x) + self.conv1(x)) + x)


class SqueezeExcite(nnx.Module):
    """timm's `SEModule(dim, 0.25)`: x · sigmoid(fc2(relu(fc1(mean_hw(x))))), fc1/fc2 1×1 convs
    with bias."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        hidden = se_channels(dim)
        self.fc1 = conv(dim, hidden, 1, rngs=rngs, dtype=dtype)
        self.fc2 = conv(hidden, dim, 1, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, dim]` -> `[B, H, W, dim]`."""
        # The mean of a large map in float32 whatever the compute dtype.
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        s = self.fc2(jax.nn.relu(self.fc1(s)))
        return x * jax.nn.sigmoid(s)


class Residual(nnx.Module):
    """Upstream `Residual(m)` around the channel MLP `m = [ConvBN 1×1, GELU, ConvBN 1×1]`: x + m(x)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        self.m = nnx.List(
            [
                ConvBN(dim, hidden, 1, rngs=rngs, dtype=dtype),
                Activation(gelu),
                ConvBN(hidden, dim, 1, rngs=rngs, dtype=dtype),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, dim]` -> `[B, H, W, dim]`."""
        return x + _run(self.m, x)


class RepViTBlock(nnx.Module):
    """Upstream `RepViTBlock`: `channel_mixer(token_mixer(x))`, both halves as described in the module doc."""

    def __init__(
        self,
        din: int,
        dout: int,
        stride: int,
        use_se: bool,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
    ):
        se = SqueezeExcite(din, rngs=rngs, dtype=dtype) if use_se else Activation(identity)
        if stride == 2:
            self.token_mixer = nnx.List(
                [
                    ConvBN(din, din, 3, stride=2, groups=din, rngs=rngs, dtype=dtype),
                    se,
                    ConvBN(din, dout, 1, rngs=rngs, dtype=dtype),
                ]
            )
        elif stride == 1 and din == dout:
            self.token_mixer = nnx.List([RepVGGDW(din, rngs=rngs, dtype=dtype), se])
        else:
            raise ValueError(
                f"a RepViT block is stride 1 with din == dout, or stride 2; got {stride}, {din}->{dout}"
            )
        self.channel_mixer = Residual(dout, MLP_RATIO * dout, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, din]` -> `[B, ceil(H / stride), ceil(W / stride), dout]`."""
        return self.channel_mixer(_run(self.token_mixer, x))


class RepViT(nnx.Module):
    """The RepViT backbone as upstream's `RepViTAdapter` runs it: `features` only, no classifier."""

    def __init__(self, kind: str, image_size: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        if kind not in VARIANTS:
            raise ValueError(f"unknown RepViT kind {kind!r}; known: {', '.join(VARIANTS)}")
        variant = VARIANTS[kind]
        self.kind = kind
        self.image_size = image_size  # informational: the network is fully convolutional
        self.dtype = dtype
        self.out_channels = variant.widths[-1]
        c0 = variant.widths[0]
        stem = nnx.List(
            [
                ConvBN(3, c0 // 2, 3, stride=2, rngs=rngs, dtype=dtype),
                Activation(gelu),
                ConvBN(c0 // 2, c0, 3, stride=2, rngs=rngs, dtype=dtype),
            ]
        )
        blocks = [RepViTBlock(*spec, rngs=rngs, dtype=dtype) for spec in variant.layers()]
        self.features = nnx.List([stem, *blocks])

    def __call__(self, images: jax.Array) -> jax.Array:
        """images `[B, S, S, 3]`, already normalised -> `[B, ceil(S/32), ceil(S/32), out_channels]`
        float32 (non-square `[B, H, W, 3]` works alike)."""
        x = images.astype(self.dtype)
        for feature in self.features:
            x = _run(feature, x) if isinstance(feature, nnx.List) else feature(x)
        return x.astype(jnp.float32)
