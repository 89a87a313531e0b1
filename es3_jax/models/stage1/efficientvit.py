"""EfficientViT (MIT, backbone B series) as an EfficientSAM3 stage-1 student trunk.

Upstream: `sam3/sam3/backbones/efficientvit/efficientvit/backbone.py` (`efficientvit_backbone_b0/b1/b2`)
with its blocks in `.../nn/ops.py`; the stage-1 adapter returns `model(x)["stage_final"]`, the output
of the last stage at stride 32. The network:

* `input_stem`: a stride-2 3×3 conv + BatchNorm + hardswish, then `depths[0]` residual DSConv blocks.
* `stages.0`, `stages.1`: `depths[i]` MBConv blocks (expand 4), the first at stride 2 without a
  shortcut, the others residual.
* `stages.2`, `stages.3`: a stride-2 MBConv without a shortcut whose first two convs have a bias and
  no norm ("fewer norm"), then `depths[i]` EfficientViT blocks: a residual LiteMLA (ReLU linear
  attention over multi-scale q/k/v) and a residual MBConv (again fewer norm).

Parameter paths mirror upstream's state-dict keys (`input_stem.op_list.0.conv.kernel`,
`stages.2.op_list.1.context_module.main.aggreg.0.1.kernel`, ...); only the leaves differ
(conv `weight` -> `kernel`, BatchNorm `weight/running_mean/running_var` -> `scale/mean/var`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from es3_jax.nn.layers import BatchNorm, DepthwiseConv, Dtype, conv

BN_EPS = 1e-5  # nn.BatchNorm2d's default, which upstream's `build_norm("bn2d")` keeps
# Upstream LiteMLA's default; timm's port of the same block uses 1e-5.
ATTN_EPS = 1e-15
EXPAND_RATIO = 4
AGGREG_SCALES = (5,)

VARIANTS: dict[str, dict] = {
    "efficientvit_b0": {"widths": (8, 16, 32, 64, 128), "depths": (1, 2, 2, 2, 2), "head_dim": 16},
    "efficientvit_b1": {"widths": (16, 32, 64, 128, 256), "depths": (1, 2, 3, 3, 4), "head_dim": 16},
    "efficientvit_b2": {"widths": (24, 48, 96, 192, 384), "depths": (1, 3, 4, 4, 6), "head_dim": 32},
}


def hardswish(x: jax.Array) -> jax.Array:
    """`nn.Hardswish`: x · relu6(x + 3) / 6."""
    return x * jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


class ConvLayer(nnx.Module):
    """Upstream `ConvLayer`: conv (symmetric k // 2 padding), optional BatchNorm `norm`, optional hardswish."""

    def __init__(
        self,
        din: int,
        dout: int,
        kernel: int,
        *,
        stride: int = 1,
        groups: int = 1,
        use_bias: bool = False,
        norm: bool = True,
        act: bool = True,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
    ):
        if groups == din == dout and kernel > 1:
            self.conv = DepthwiseConv(din, kernel, stride=stride, use_bias=use_bias, rngs=rngs, dtype=dtype)
        else:
            self.conv = conv(
                din,
                dout,
                kernel,
                stride=stride,
                padding=kernel // 2,
                groups=groups,
                use_bias=use_bias,
                rngs=rngs,
                dtype=dtype,
            )
        self.norm = BatchNorm(dout, eps=BN_EPS, rngs=rngs, dtype=dtype) if norm else None
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, din]` -> `[B, ceil(H / stride), ceil(W / stride), dout]`."""
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return hardswish(x) if self.act else x


class DSConv(nnx.Module):
    """Depthwise 3×3 (+ BatchNorm + hardswish), then pointwise 1×1 + BatchNorm."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        self.depth_conv = ConvLayer(dim, dim, 3, groups=dim, rngs=rngs, dtype=dtype)
        self.point_conv = ConvLayer(dim, dim, 1, act=False, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C]`."""
        return self.point_conv(self.depth_conv(x))


class MBConv(nnx.Module):
    """Inverted bottleneck: 1×1 expand, depthwise 3×3 (carrying the stride), 1×1 project + BatchNorm.

    `fewer_norm`: the first two convs have a bias instead of a BatchNorm (downsampling into and
    local mixing inside the attention stages).
    """

    def __init__(
        self,
        din: int,
        dout: int,
        *,
        stride: int,
        fewer_norm: bool,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
    ):
        mid = din * EXPAND_RATIO
        kw = {"use_bias": fewer_norm, "norm": not fewer_norm, "rngs": rngs, "dtype": dtype}
        self.inverted_conv = ConvLayer(din, mid, 1, **kw)
        self.depth_conv = ConvLayer(mid, mid, 3, stride=stride, groups=mid, **kw)
        self.point_conv = ConvLayer(mid, dout, 1, act=False, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, din]` -> `[B, ceil(H / stride), ceil(W / stride), dout]`."""
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


class ResidualBlock(nnx.Module):
    """`main(x) + x`, or `main(x)` alone where upstream's shortcut is None (the stride-2 blocks)."""

    def __init__(self, main: nnx.Module, shortcut: bool):
        self.main = main
        self.shortcut = shortcut

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.main(x)
        return y + x if self.shortcut else y


class LiteMLA(nnx.Module):
    """Multi-scale ReLU linear attention over all `H·W` positions.

    A bias-free 1×1 conv makes q|k|v for `heads = dim // head_dim` heads (channels grouped by head,
    then q, k, v of `head_dim` each inside a head); each aggregation scale adds a copy of them mixed by
    a depthwise k×k conv and a 1×1 conv grouped per q/k/v of a head, as extra heads. Per head
    `out_n = Σ_m v_m (k_m·q_n) / (Σ_m k_m·q_n + eps)` with ReLU'd q and k, evaluated in linear form
    (`kᵀv` first). Upstream switches to the quadratic form (`(kᵀq)` normalised) when
    `H·W <= head_dim`; the two are equal up to rounding, so the linear form serves every size.
    """

    def __init__(self, dim: int, head_dim: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        heads = dim // head_dim
        total = 3 * heads * head_dim
        self.head_dim = head_dim
        self.dtype = dtype
        self.qkv = ConvLayer(dim, total, 1, norm=False, act=False, rngs=rngs, dtype=dtype)
        self.aggreg = nnx.List(
            [
                nnx.List(
                    [
                        conv(
                            total,
                            total,
                            s,
                            padding=s // 2,
                            groups=total,
                            use_bias=False,
                            rngs=rngs,
                            dtype=dtype,
                        ),
                        conv(total, total, 1, groups=3 * heads, use_bias=False, rngs=rngs, dtype=dtype),
                    ]
                )
                for s in AGGREG_SCALES
            ]
        )
        self.proj = ConvLayer(
            heads * head_dim * (1 + len(AGGREG_SCALES)), dim, 1, act=False, rngs=rngs, dtype=dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C]`."""
        qkv = self.qkv(x)
        qkv = jnp.concatenate([qkv] + [dw_pw[1](dw_pw[0](qkv)) for dw_pw in self.aggreg], axis=-1)
        b, h, w, c = qkv.shape
        d = self.head_dim
        # Upstream runs this outside autocast and divides in float32 (timm: all of it in float32):
        # the sums run over all h·w positions, too many terms for bfloat16's 8-bit mantissa.
        qkv = qkv.reshape(b, h * w, c // (3 * d), 3 * d).astype(jnp.float32)
        q = jax.nn.relu(qkv[..., :d])
        k = jax.nn.relu(qkv[..., d : 2 * d])
        v = qkv[..., 2 * d :]
        kv = jnp.einsum("bngd,bnge->bgde", k, v)
        num = jnp.einsum("bngd,bgde->bnge", q, kv)
        den = jnp.einsum("bngd,bgd->bng", q, k.sum(axis=1))
        out = num / (den[..., None] + ATTN_EPS)
        return self.proj(out.reshape(b, h, w, c // 3).astype(self.dtype))


class EfficientViTBlock(nnx.Module):
    """Residual LiteMLA (`context_module`), then residual fewer-norm MBConv (`local_module`)."""

    def __init__(self, dim: int, head_dim: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        self.context_module = ResidualBlock(LiteMLA(dim, head_dim, rngs=rngs, dtype=dtype), shortcut=True)
        self.local_module = ResidualBlock(
            MBConv(dim, dim, stride=1, fewer_norm=True, rngs=rngs, dtype=dtype), shortcut=True
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C]`."""
        return self.local_module(self.context_module(x))


class OpSequential(nnx.Module):
    """Upstream `OpSequential`: its blocks in `op_list`, run in order."""

    def __init__(self, ops: list[nnx.Module]):
        self.op_list = nnx.List(ops)

    def __call__(self, x: jax.Array) -> jax.Array:
        for op in self.op_list:
            x = op(x)
        return x


class EfficientViT(nnx.Module):
    """The EfficientViT-B backbone up to `stage_final` (stride 32).

    Any image size works, as upstream: every stride-2 layer is a 3×3 conv padded by 1, so each of the
    five halvings rounds up (1008 -> 504 -> 252 -> 126 -> 63 -> 32).
    """

    def __init__(self, kind: str, image_size: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        if kind not in VARIANTS:
            raise ValueError(f"unknown EfficientViT kind {kind!r}; expected one of {sorted(VARIANTS)}")
        cfg = VARIANTS[kind]
        widths, depths, head_dim = cfg["widths"], cfg["depths"], cfg["head_dim"]
        self.kind = kind
        self.image_size = image_size
        self.out_channels: int = widths[-1]
        self.dtype = dtype
        kw = {"rngs": rngs, "dtype": dtype}

        stem: list[nnx.Module] = [ConvLayer(3, widths[0], 3, stride=2, **kw)]
        stem += [ResidualBlock(DSConv(widths[0], **kw), shortcut=True) for _ in range(depths[0])]
        self.input_stem = OpSequential(stem)

        stages = []
        din = widths[0]
        for i, (w, d) in enumerate(zip(widths[1:], depths[1:], strict=True)):
            attention = i >= 2
            ops: list[nnx.Module] = [
                ResidualBlock(MBConv(din, w, stride=2, fewer_norm=attention, **kw), shortcut=False)
            ]
            if attention:
                ops += [EfficientViTBlock(w, head_dim, **kw) for _ in range(d)]
            else:
                ops += [
                    ResidualBlock(MBConv(w, w, stride=1, fewer_norm=False, **kw), shortcut=True)
                    for _ in range(d - 1)
                ]
            stages.append(OpSequential(ops))
            din = w
        self.stages = nnx.List(stages)

    def __call__(self, images: jax.Array) -> jax.Array:
        """images `[B, S, S, 3]` float, already normalised -> `[B, ceil(S/32), ceil(S/32), out_channels]` float32."""
        x = self.input_stem(images.astype(self.dtype))
        for stage in self.stages:
            x = stage(x)
        return x.astype(jnp.float32)
