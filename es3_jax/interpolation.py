"""Bilinear resizing in NumPy, as torch's `F.interpolate(mode='bilinear', align_corners=False)`.

The host side of tracking resizes mask logits (prompt masks to the model's sizes, low-res logits
to the video's size) with this, in the JAX predictor and in the ONNX driver alike, so that both
see the same numbers; `es3_jax.nn.layers.resize_bilinear` builds its two-tap tables here too.
No jax: the ONNX driver imports it.
"""

from __future__ import annotations

import numpy as np

_F32 = np.float32


def linear_taps(n: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel two-tap interpolation from `n` to `size` samples -> (i0, i1, w0, w1) `[size]`:
    output k is `x[i0] · w0 + x[i1] · w1`.

    Source coordinates are computed in float32 in the order torch's CPU kernel computes them (no
    fused multiply-add), which keeps up-sampled logits equal to torch's.
    """
    src = np.maximum(_F32(n) / _F32(size) * (np.arange(size, dtype=_F32) + _F32(0.5)) - _F32(0.5), _F32(0))
    i0 = np.minimum(np.floor(src).astype(np.int32), n - 1)
    i1 = i0 + (i0 < n - 1)
    w1 = np.clip(src - i0.astype(_F32), _F32(0), _F32(1))
    return i0, i1, _F32(1) - w1, w1


def antialias_weights(n: int, size: int) -> np.ndarray:
    """Down-sampling from `n` to `size < n` samples with a triangle filter widened by the scale factor
    (torch's antialiased bilinear) -> `[size, n]` float32, each row summing to 1.

    Computed in float32 in torch's order, window included: output centres near 1000 carry float32
    rounding of ~1e-4, which exact arithmetic would not reproduce.
    """
    scale = _F32(n) / _F32(size)
    centre = scale * (np.arange(size, dtype=_F32) + _F32(0.5))
    source = np.arange(n, dtype=_F32)
    distance = ((source[None, :] - centre[:, None]) + _F32(0.5)) * (_F32(1) / scale)
    weights = np.maximum(_F32(1) - np.abs(distance), _F32(0))
    first = np.maximum((centre - scale + _F32(0.5)).astype(np.int64), 0)
    stop = np.minimum((centre + scale + _F32(0.5)).astype(np.int64), n)
    index = np.arange(n)[None, :]
    weights = np.where((index >= first[:, None]) & (index < stop[:, None]), weights, _F32(0))
    return weights / weights.sum(axis=1, keepdims=True, dtype=_F32)


def _resize_axis(x: np.ndarray, size: int, axis: int, *, antialias: bool = False) -> np.ndarray:
    """One axis of `x` resized to `size` samples (antialiased when asked and shrinking)."""
    n = x.shape[axis]
    if n == size:
        return x
    if antialias and size < n:
        out = np.tensordot(antialias_weights(n, size), x, axes=([1], [axis]))
        return np.moveaxis(out, 0, axis)
    i0, i1, w0, w1 = linear_taps(n, size)
    shape = [1] * x.ndim
    shape[axis] = size
    return np.take(x, i0, axis=axis) * w0.reshape(shape) + np.take(x, i1, axis=axis) * w1.reshape(shape)


def resize_bilinear(x: np.ndarray, height: int, width: int, *, antialias: bool = False) -> np.ndarray:
    """`[..., h, w]` -> `[..., height, width]` float32 (a new array, never a view of `x`)."""
    x = np.asarray(x, _F32)
    out = _resize_axis(
        _resize_axis(x, width, x.ndim - 1, antialias=antialias), height, x.ndim - 2, antialias=antialias
    )
    return np.array(out, _F32, copy=True)
