"""Thin layer factories with the numerics the upstream PyTorch code uses.

Everything is channels-last: images are `[B, H, W, C]`, token sequences `[B, N, C]`.
Parameters are float32; `dtype` is the compute dtype.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from es3_jax.interpolation import antialias_weights, linear_taps

Dtype = jnp.dtype | type


def call_layer(layer: Callable, *args: jax.Array, remat: bool = False, **kwargs) -> jax.Array:
    """`layer(*args, **kwargs)`; with `remat`, under `jax.checkpoint` keeping nothing of the layer's
    insides for the backward pass, which recomputes them from `args` (TRAIN.REMAT `layer`)."""
    if not remat:
        return layer(*args, **kwargs)
    policy = jax.checkpoint_policies.nothing_saveable
    return jax.checkpoint(lambda *a: layer(*a, **kwargs), policy=policy)(*args)


def gelu(x: jax.Array) -> jax.Array:
    """The exact (erf) GELU of `torch.nn.GELU()`; JAX defaults to the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def layer_norm(dim: int, *, eps: float, rngs: nnx.Rngs, dtype: Dtype = jnp.float32) -> nnx.LayerNorm:
    """LayerNorm over the last axis, statistics in float32 with the two-pass variance torch uses.

    `eps` is explicit because upstream mixes 1e-5 (`nn.LayerNorm`) and 1e-6 (`LayerNorm2d`).
    """
    return nnx.LayerNorm(
        dim, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
    )


def linear(
    din: int, dout: int, *, rngs: nnx.Rngs, use_bias: bool = True, dtype: Dtype = jnp.float32
) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def conv(
    din: int,
    dout: int,
    kernel: int,
    *,
    rngs: nnx.Rngs,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
) -> nnx.Conv:
    """A 2-D convolution with torch's symmetric explicit padding (never 'SAME', which pads (0, 1) at stride 2).

    `groups` as torch's: the kernel is `[k, k, din / groups, dout]`, torch's `[dout, din / groups, k, k]`
    permuted (2, 3, 1, 0).
    """
    return nnx.Conv(
        din,
        dout,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def _taps(padded: jax.Array, k: int, stride: int, ho: int, wo: int):
    """((dy, dx), window `[B, ho, wo, C]`) of a k×k kernel's taps over a padded `[B, H, W, C]` input,
    row-major: the inputs each tap multiplies."""
    for dy in range(k):
        for dx in range(k):
            yield (
                (dy, dx),
                padded[:, dy : dy + stride * (ho - 1) + 1 : stride, dx : dx + stride * (wo - 1) + 1 : stride],
            )


class TapConv(nnx.Module):
    """`nn.Conv2d(din, dout, k, stride, padding)` as one matrix product over its k² taps: the strided
    windows of the padded input are laid side by side on the channel axis `[B, Ho, Wo, k²·din]` and
    multiplied by the kernel flattened to `[k²·din, dout]`.

    XLA's CPU backend computes a convolution's kernel gradient as another convolution whose window is
    the whole output, at about 2 GFLOP/s: the memory encoder's stride-2 3×3 and 1×1 convs were half
    the demo's fine-tuning step (545 → 290 ms as matrix products). On every backend the products
    are plain GEMMs. Parameters keep `nnx.Conv`'s layout: `kernel` `[k, k, din, dout]`, `bias` `[dout]`.
    """

    def __init__(
        self,
        din: int,
        dout: int,
        kernel: int,
        *,
        stride: int = 1,
        padding: int = 0,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
    ):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (kernel, kernel, din, dout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32))
        self.stride, self.padding = stride, padding
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, din]` -> `[B, (H + 2p - k) // s + 1, (W + 2p - k) // s + 1, dout]`."""
        k, _, din, dout = self.kernel.shape
        s, p = self.stride, self.padding
        _, h, w, _ = x.shape
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        padded = jnp.pad(x.astype(self.dtype), ((0, 0), (p, p), (p, p), (0, 0)))
        taps = jnp.concatenate([tap for _, tap in _taps(padded, k, s, ho, wo)], axis=-1)
        kernel = self.kernel[...].astype(self.dtype).reshape(k * k * din, dout)
        return taps @ kernel + self.bias[...].astype(self.dtype)


class BatchNorm(nnx.Module):
    """`nn.BatchNorm2d` / `BatchNorm1d` in inference form over the last axis, from running statistics.

    Frozen trunks never update the statistics, so they are held as parameters beside the affine
    ones: `scale`, `bias`, `mean`, `var` `[C]` are torch's `weight`, `bias`, `running_mean`,
    `running_var`. Computed in float32 whatever the compute dtype, then cast back.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        del rngs  # torch's initial state (scale 1, bias 0, mean 0, var 1) needs no randomness
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.mean = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.var = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[..., C]` -> `[..., C]`."""
        scale = self.scale[...] * jax.lax.rsqrt(self.var[...] + self.eps)
        shift = self.bias[...] - self.mean[...] * scale
        return (x.astype(jnp.float32) * scale + shift).astype(self.dtype)


DEPTHWISE_SCOPE = "depthwise_conv"


class DepthwiseConv(nnx.Module):
    """`nn.Conv2d(dim, dim, k, stride, padding=k // 2, groups=dim, bias=use_bias)`, written as a sum of
    k² shifted (strided) products.

    XLA's CPU backend runs a grouped convolution 2-8× slower than this sum at the trunks' sizes, and
    computes its kernel gradient as a dense `[k, k, dim, dim]` convolution, `dim` times the work;
    the shifted sum fuses into elementwise loops on every backend. Parameters keep `nnx.Conv`'s
    layout: `kernel` `[k, k, 1, dim]`, `bias` `[dim]` when there is one.
    """

    def __init__(
        self,
        dim: int,
        kernel: int,
        *,
        stride: int = 1,
        use_bias: bool = True,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
    ):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (kernel, kernel, 1, dim), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32)) if use_bias else None
        self.stride = stride
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, dim]` -> `[B, ceil(H / stride), ceil(W / stride), dim]` (odd k)."""
        k, s = self.kernel.shape[0], self.stride
        _, h, w, _ = x.shape
        ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
        kernel = self.kernel[...].astype(self.dtype)
        padded = jnp.pad(x.astype(self.dtype), ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
        # The scope marks the taps' products as a convolution's (`es3_jax.models.flops` counts them).
        with jax.named_scope(DEPTHWISE_SCOPE):
            y = sum(tap * kernel[dy, dx, 0] for (dy, dx), tap in _taps(padded, k, s, ho, wo))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class ConvBN(nnx.Module):
    """A bias-free conv `c` (padding k // 2) then an inference-form BatchNorm `bn`: upstream's
    `Conv2d_BN` in RepViT and TinyViT. A depthwise one (`groups == din == dout`) is a
    `DepthwiseConv`, with the same parameter layout."""

    def __init__(
        self,
        din: int,
        dout: int,
        kernel: int = 1,
        *,
        stride: int = 1,
        groups: int = 1,
        eps: float = 1e-5,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
    ):
        if groups > 1 and groups == din == dout:
            self.c = DepthwiseConv(din, kernel, stride=stride, use_bias=False, rngs=rngs, dtype=dtype)
        else:
            self.c = conv(
                din, dout, kernel, stride=stride, padding=kernel // 2, groups=groups, use_bias=False,
                rngs=rngs, dtype=dtype,
            )  # fmt: skip
        self.bn = BatchNorm(dout, eps=eps, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, din]` -> `[B, ceil(H / stride), ceil(W / stride), dout]` (odd kernel)."""
        return self.bn(self.c(x))


class Activation(nnx.Module):
    """A parameter-less layer (`nn.GELU()`, `nn.Identity()`, ...): it holds its index in a module
    list mirroring a torch `nn.Sequential`, so that parameter paths keep torch's indices."""

    def __init__(self, fn: Callable[[jax.Array], jax.Array]):
        self.fn = fn

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fn(x)


def identity(x: jax.Array) -> jax.Array:
    return x


class ConvTranspose2x2(nnx.Module):
    """`nn.ConvTranspose2d(kernel_size=2, stride=2)`: each input pixel writes its own 2×2 output block.

    Written as an einsum so no kernel-flip convention is involved. `kernel` is `[2, 2, Cin, Cout]`
    (torch's `[Cin, Cout, 2, 2]` permuted (2, 3, 0, 1)).
    """

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (2, 2, din, dout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, Cin]` -> `[B, 2H, 2W, Cout]`."""
        b, h, w, _ = x.shape
        kernel = self.kernel[...].astype(self.dtype)
        y = jnp.einsum("bhwi,yxio->bhywxo", x.astype(self.dtype), kernel)
        y = y.reshape(b, 2 * h, 2 * w, kernel.shape[-1])
        return y + self.bias[...].astype(self.dtype)


class MLP(nnx.Module):
    """A stack of Linear layers with an activation between them (none after the last).

    The shape of SAM's `MLP` heads: `dims = [in, hidden, ..., out]`.
    """

    def __init__(
        self,
        dims: Sequence[int],
        *,
        rngs: nnx.Rngs,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        dtype: Dtype = jnp.float32,
    ):
        self.layers = nnx.List([linear(a, b, rngs=rngs, dtype=dtype) for a, b in itertools.pairwise(dims)])
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.activation(x)
        return x


def resize_bilinear(x: jax.Array, height: int, width: int, *, antialias: bool = False) -> jax.Array:
    """`F.interpolate(mode='bilinear', align_corners=False)` on `[B, H, W, C]` (half-pixel centres).

    `antialias=True` matches torch's antialiased down-sampling (a triangle filter widened by the
    scale factor, to ~3e-7 relative); for up-sampling it is the same as plain bilinear. Without
    antialiasing, and for up-sampling, the result equals torch's float32 CPU output. The filter
    tables are `es3_jax.interpolation`'s, which the host-side NumPy resizing uses too.
    """
    x = _resize_axis(x, width, axis=2, antialias=antialias)
    return _resize_axis(x, height, axis=1, antialias=antialias)


def _resize_axis(x: jax.Array, size: int, *, axis: int, antialias: bool) -> jax.Array:
    n = x.shape[axis]
    if n == size:
        return x
    if antialias and size < n:
        weights = jnp.asarray(antialias_weights(n, size), x.dtype)
        out = jnp.tensordot(weights, x, axes=([1], [axis]), precision=jax.lax.Precision.HIGHEST)
        return jnp.moveaxis(out, 0, axis)
    # Two-tap interpolation with torch's float32 source coordinates: `jax.image.resize` rounds
    # them differently, which moves up-sampled 288² mask logits to 1008² by ~2e-5 relative.
    i0, i1, w0, w1 = linear_taps(n, size)
    shape = [1] * x.ndim
    shape[axis] = size
    w0 = jnp.asarray(w0.reshape(shape), x.dtype)
    w1 = jnp.asarray(w1.reshape(shape), x.dtype)
    return jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1
