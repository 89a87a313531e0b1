"""The attention core (`es3_jax.nn.attention.attend`) against torch's `scaled_dot_product_attention`,
and the implementation it chooses per platform."""

import jax.numpy as jnp
import numpy as np
import pytest

from es3_jax.nn.attention import attend, cudnn_fits, lowering_for
from tests import upstream
from tests.figures import softmax_tolerance

torch = upstream.torch


@pytest.mark.parametrize("keys", [300, 2500])
def test_attend_matches_torch_scaled_dot_product_attention(keys: int):
    """Memory-bank shaped: one 256-wide head, a per-key bias, keys in one block or several."""
    rng = np.random.default_rng(upstream.fresh_seed())
    b, nq, h, d = 2, 600, 1, 256
    q, k = (rng.normal(size=(b, n, h, d)).astype(np.float32) * 0.5 for n in (nq, keys))
    v = rng.normal(size=(b, keys, h, d)).astype(np.float32)
    bias = (rng.normal(size=(b, 1, 1, keys)) * 2).astype(np.float32)
    ours = attend(*map(jnp.asarray, (q, k, v)), bias=jnp.asarray(bias))
    heads_first = [torch.from_numpy(t).transpose(1, 2) for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*heads_first, attn_mask=torch.from_numpy(bias))
    largest = float(np.abs(np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d) + bias).max())
    tol = 2 * softmax_tolerance(largest, reduction=keys)
    upstream.report(f"attend vs torch sdpa, {keys} keys", ours, ref.transpose(1, 2).numpy(), tol)


def _shapes(nq, nk, d, dtype=jnp.bfloat16):
    return jnp.zeros((1, nq, 2, d), dtype), jnp.zeros((1, nk, 2, d), dtype), jnp.zeros((1, nk, 2, d), dtype)


@pytest.mark.parametrize(
    ("what", "args", "terms", "fits"),
    [
        ("ViT heads in bf16", _shapes(576, 576, 64), {}, True),
        ("float32 inputs", _shapes(576, 576, 64, jnp.float32), {}, False),
        ("a 256-wide head", _shapes(576, 576, 256), {}, False),
        ("a head dim not a multiple of 8", _shapes(576, 576, 20), {}, False),
        (
            "a bias for every query and key",
            _shapes(576, 576, 64),
            {"bias": jnp.zeros((1, 2, 576, 576))},
            True,
        ),
        ("a per-key mask", _shapes(576, 1000, 64), {"mask": jnp.ones((1, 1, 1, 1000), bool)}, False),
        ("a bias over odd lengths", _shapes(49, 49, 64), {"bias": jnp.zeros((1, 2, 49, 49))}, False),
    ],
)
def test_cudnn_takes_the_problems_its_fused_kernel_supports(what, args, terms, fits):
    assert cudnn_fits(*args, **terms) == fits, what


def test_lowering_for_names_the_platforms_it_knows():
    with (
        pytest.raises(ValueError, match=r"no attention for platform 'tpu': one of \['cpu', 'gpu'\]"),
        lowering_for("tpu"),
    ):
        pass
