"""`TapConv` against XLA's own convolution: values and gradients, for the strides and paddings the
models use."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from es3_jax.nn.layers import TapConv


def _convolution(x, kernel, bias, stride, padding):
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    return y + bias


@pytest.mark.parametrize(
    ("k", "stride", "padding", "size"),
    [(3, 2, 1, 12), (3, 2, 1, 11), (1, 1, 0, 6), (3, 1, 1, 7), (2, 2, 0, 8)],
)
def test_tap_conv_matches_a_convolution_and_its_gradients(k, stride, padding, size):
    graph, _ = nnx.split(TapConv(5, 7, k, stride=stride, padding=padding, rngs=nnx.Rngs(0)))

    def tap_conv(x, kernel, bias):
        return nnx.merge(graph, nnx.State({"kernel": nnx.Param(kernel), "bias": nnx.Param(bias)}))(x)

    keys = jax.random.split(jax.random.key(k * 100 + size), 4)
    x = jax.random.normal(keys[0], (2, size, size, 5))
    kernel = jax.random.normal(keys[1], (k, k, 5, 7))
    bias = jax.random.normal(keys[2], (7,))
    want, conv_vjp = jax.vjp(lambda *a: _convolution(*a, stride, padding), x, kernel, bias)
    got, tap_vjp = jax.vjp(tap_conv, x, kernel, bias)
    assert got.shape == want.shape, f"TapConv output {got.shape}, the convolution's {want.shape}"
    np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()), err_msg="TapConv output")

    cotangent = jax.random.normal(keys[3], want.shape)
    for name, g, w in zip(("input", "kernel", "bias"), tap_vjp(cotangent), conv_vjp(cotangent), strict=True):
        np.testing.assert_allclose(
            g, w, atol=1e-5 * float(jnp.abs(w).max()), err_msg=f"TapConv {name} gradient"
        )
