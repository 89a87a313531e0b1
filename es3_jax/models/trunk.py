"""The SAM3 ViT trunk (ViTDet-style): frames -> the `[B, S/14, S/14, 1024]` features the tracker neck reads.

Upstream: `sam3/model/vitdet.py` built by `sam3/model_builder.py:69-96`. A 14×14 patch conv without
bias, an absolute position table learned at the pretraining grid (24×24) and tiled (not
interpolated) over the token grid, `ln_pre`, then pre-norm blocks of windowed attention (24×24
windows; zero-padded when the grid is not a multiple of the window) with global attention in
a few blocks. Every block rotates queries and keys with 2-D axial RoPE: window blocks at their
local window positions, global blocks at grid positions rescaled onto the window grid
(`window / grid`, 1/3 at 1008 px), which is upstream's RoPE interpolation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from es3_jax.config import Config, ConfigError
from es3_jax.models.stage1.stage1_trunk import Stage1Trunk
from es3_jax.nn.attention import attend
from es3_jax.nn.layers import Dtype, conv, gelu, layer_norm, linear
from es3_jax.nn.rope import apply_rope, axial_angles, grid_positions
from es3_jax.params import bind, flatten

LN_EPS = 1e-5  # torch nn.LayerNorm default, which upstream's ViT uses
ROPE_THETA = 10000.0


class PatchEmbed(nnx.Module):
    def __init__(self, patch_size: int, width: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        self.proj = conv(3, width, patch_size, stride=patch_size, use_bias=False, rngs=rngs, dtype=dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        """`[B, S, S, 3]` -> `[B, S/p, S/p, width]` (floor division, as an unpadded stride-p conv)."""
        return self.proj(images)


class ViTAttention(nnx.Module):
    """Multi-head self-attention with one fused `qkv` projection (channels ordered q|k|v, then heads)."""

    def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        self.num_heads = num_heads
        self.qkv = linear(width, 3 * width, rngs=rngs, dtype=dtype)
        self.proj = linear(width, width, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, angles: jax.Array) -> jax.Array:
        """x `[B, N, C]`, angles `[N, head_dim/2]` -> `[B, N, C]`."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        rot = angles[:, None, :]  # the same angles in every head
        q = apply_rope(qkv[:, :, 0], rot)
        k = apply_rope(qkv[:, :, 1], rot)
        v = qkv[:, :, 2]
        out = attend(q, k, v)
        return self.proj(out.reshape(b, n, c))


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        self.fc1 = linear(width, hidden, rngs=rngs, dtype=dtype)
        self.fc2 = linear(hidden, width, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


class ViTBlock(nnx.Module):
    """Pre-norm block; `window_size` 0 means global attention over the whole grid."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_dim: int,
        window_size: int,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
    ):
        self.window_size = window_size
        self.norm1 = layer_norm(width, eps=LN_EPS, rngs=rngs, dtype=dtype)
        self.attn = ViTAttention(width, num_heads, rngs=rngs, dtype=dtype)
        self.norm2 = layer_norm(width, eps=LN_EPS, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(width, mlp_dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, angles: jax.Array) -> jax.Array:
        """x `[B, H, W, C]`, angles `[tokens per attention group, head_dim/2]` -> `[B, H, W, C]`."""
        b, h, w, c = x.shape
        y = self.norm1(x)
        if self.window_size:
            y = _attend_windows(self.attn, y, self.window_size, angles)
        else:
            y = self.attn(y.reshape(b, h * w, c), angles).reshape(b, h, w, c)
        x = x + y
        return x + self.mlp(self.norm2(x))


def _attend_windows(attn: ViTAttention, x: jax.Array, ws: int, angles: jax.Array) -> jax.Array:
    """Attention within non-overlapping `ws × ws` windows of `x [B, H, W, C]`.

    As upstream, a grid that is not a multiple of `ws` is padded at the bottom/right with zeros
    *after* the norm, and the padded tokens take part in the attention of their windows (they are
    not masked), then are cropped away.
    """
    b, h, w, c = x.shape
    ph, pw = -h % ws, -w % ws
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    nh, nw = (h + ph) // ws, (w + pw) // ws
    windows = x.reshape(b, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, ws * ws, c)
    out = attn(windows, angles)
    out = out.reshape(b, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, nh * ws, nw * ws, c)
    return out[:, :h, :w]


class ViTTrunk(nnx.Module):
    """The SAM3 ViT. Parameter paths follow upstream (`patch_embed.proj`, `blocks.{i}.attn.qkv`, ...).

    `pos_embed` is `[1, P², width]` with P = pretrain_image_size // patch_size: upstream's table also
    holds a class-token row first, which the tracker never uses (the port drops it).
    The output is that of the last global block, as upstream (`vitdet.py:841-853`): blocks after it
    do not contribute, so they are not run.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        window_size: int,
        global_blocks: Sequence[int],
        pretrain_image_size: int,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
    ):
        global_blocks = tuple(sorted(set(global_blocks)))
        if not global_blocks or global_blocks[0] < 0 or global_blocks[-1] >= depth:
            raise ValueError(
                f"global_blocks {global_blocks} must be non-empty block indices below depth {depth}"
            )
        if width % num_heads or (width // num_heads) % 4:
            raise ValueError(f"num_heads {num_heads} must split width {width} into heads of a multiple of 4")
        if window_size <= 0 or image_size < patch_size or pretrain_image_size < patch_size:
            raise ValueError(
                f"bad trunk geometry: window {window_size}, image {image_size}, pretrain image "
                f"{pretrain_image_size}, patch {patch_size}"
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.window_size = window_size
        self.global_blocks = global_blocks
        self.head_dim = width // num_heads
        self.dtype = dtype
        pretrain_grid = pretrain_image_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, width, rngs=rngs, dtype=dtype)
        self.pos_embed = nnx.Param(
            0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (1, pretrain_grid**2, width))
        )
        self.ln_pre = layer_norm(width, eps=LN_EPS, rngs=rngs, dtype=dtype)
        self.blocks = nnx.List(
            [
                ViTBlock(
                    width,
                    num_heads,
                    mlp_dim,
                    0 if i in global_blocks else window_size,
                    rngs=rngs,
                    dtype=dtype,
                )
                for i in range(depth)
            ]
        )

    @property
    def grid(self) -> int:
        """Tokens per side of the output."""
        return self.image_size // self.patch_size

    def __call__(self, images: jax.Array) -> jax.Array:
        """images `[B, S, S, 3]` float, already normalised (S = image_size) -> `[B, S/14, S/14, width]` float32."""
        if images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"trunk expects images [B, {self.image_size}, {self.image_size}, 3], got {images.shape}"
            )
        x = self.patch_embed(images.astype(self.dtype)).astype(jnp.float32)
        g = x.shape[1]
        x = self.ln_pre(x + self._tiled_pos_embed(g))
        ws = self.window_size
        window_angles = axial_angles(grid_positions(ws, ws), self.head_dim, ROPE_THETA)
        # Global blocks see the grid through RoPE as if it were one window (upstream's rope_interp).
        global_angles = axial_angles(grid_positions(g, g, ws / g), self.head_dim, ROPE_THETA)
        for i in range(self.global_blocks[-1] + 1):
            block = self.blocks[i]
            x = block(x, window_angles if block.window_size else global_angles)
        return x.astype(jnp.float32)

    def _tiled_pos_embed(self, g: int) -> jax.Array:
        """The `[P², C]` pretraining table tiled over a `g × g` grid -> `[1, g, g, C]`."""
        table = self.pos_embed[...]
        p = round(table.shape[1] ** 0.5)
        reps = -(-g // p)
        tiled = jnp.tile(table.reshape(p, p, -1), (reps, reps, 1))[:g, :g]
        return tiled[None]


def trunk_from_config(
    cfg: Config, params: Mapping | None = None, *, seed: int = 0, dtype: Dtype = jnp.float32
) -> ViTTrunk | Stage1Trunk:
    """The trunk `cfg.MODEL.TRUNK` describes (SAM3's ViT, or the stage-1 student `KIND` names) at
    input size `cfg.MODEL.TEACHER.IMAGE_SIZE`, giving `[B, S/14, S/14, TRUNK_DIM]` features.

    Random weights from `seed` when `params` is None; otherwise `params` (nested, as
    `porting.sam3_checkpoint.port_trunk` / `porting.stage1_checkpoint.port_stage1_trunk` return)
    are bound strictly: a missing, extra or mis-shaped parameter is a `ParamMismatchError` listing
    them all.
    """
    t, teacher = cfg.MODEL.TRUNK, cfg.MODEL.TEACHER

    def factory() -> ViTTrunk | Stage1Trunk:
        if t.KIND != "sam3_vit":
            grid = teacher.IMAGE_SIZE // teacher.BACKBONE_STRIDE
            return Stage1Trunk(
                t.KIND, teacher.IMAGE_SIZE, grid, teacher.TRUNK_DIM, rngs=nnx.Rngs(seed), dtype=dtype
            )
        return ViTTrunk(
            teacher.IMAGE_SIZE,
            t.PATCH_SIZE,
            t.WIDTH,
            t.DEPTH,
            t.NUM_HEADS,
            t.MLP_DIM,
            t.WINDOW_SIZE,
            t.GLOBAL_BLOCKS,
            t.PRETRAIN_IMAGE_SIZE,
            rngs=nnx.Rngs(seed),
            dtype=dtype,
        )

    return factory() if params is None else bind(factory, params, source=f"trunk {t.KIND}")


def trunk_fingerprint(params: Mapping) -> str:
    """A short stable hash of every trunk parameter: its path, shape, and float32 bytes.

    `params` is the nested dict of `port_trunk` or `es3_jax.params.param_dict(trunk)`. Two trunks
    with the same fingerprint compute the same features; it identifies the trunk in store metadata.
    """
    h = hashlib.sha256()
    for path, value in sorted(flatten(params).items()):
        array = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
        h.update(f"{path}:{array.shape};".encode())
        h.update(array.tobytes())
    return f"sha256:{h.hexdigest()[:16]}"


def compute_dtype(name: str) -> jnp.dtype:
    """`MODEL.COMPUTE_DTYPE` as a dtype: `auto` is bfloat16 on accelerators and float32 on CPU."""
    if name == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    try:
        return jnp.dtype(name)
    except TypeError as e:
        raise ConfigError(f"MODEL.COMPUTE_DTYPE: unknown dtype {name!r} (auto, float32, bfloat16)") from e
