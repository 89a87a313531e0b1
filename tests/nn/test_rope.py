"""Axial RoPE (`es3_jax.nn.rope`) against upstream `sam3/sam/rope.py`."""

import jax.numpy as jnp
import numpy as np
import pytest

from es3_jax.nn.rope import apply_rope, axial_angles, grid_positions
from tests import upstream
from tests.figures import FLOAT32_EPS

torch = upstream.torch
sam3_rope = pytest.importorskip("sam3.sam.rope")


@pytest.mark.numerics
@pytest.mark.parametrize(("height", "width", "head_dim"), [(72, 72, 256), (6, 10, 64)])
def test_axial_angles_match_compute_axial_cis(height: int, width: int, head_dim: int):
    ref = sam3_rope.compute_axial_cis(dim=head_dim, end_x=width, end_y=height, theta=10000.0)
    tx, ty = sam3_rope.init_t_xy(width, height)
    positions = np.asarray(grid_positions(height, width))
    np.testing.assert_array_equal(positions, torch.stack([tx, ty], -1).numpy())
    angles = axial_angles(grid_positions(height, width), head_dim, 10000.0)
    assert angles.shape == (height * width, head_dim // 2)
    # An angle is position × frequency, and each side rounds the frequency (a power) and the product
    # with its own math library: up to an ulp each of the angle, which cos and sin pass on, plus
    # their own ulp.
    tol = FLOAT32_EPS * (2 * float(np.abs(angles).max()) + 1)
    upstream.report(f"cos {height}x{width}", jnp.cos(angles), ref.real.numpy(), tol)
    upstream.report(f"sin {height}x{width}", jnp.sin(angles), ref.imag.numpy(), tol)


@pytest.mark.parametrize("repeats", [1, 3])
def test_apply_rope_matches_apply_rotary_enc(repeats: int):
    seed = upstream.fresh_seed()
    g = torch.Generator().manual_seed(seed)
    height, width, head_dim, heads = 12, 12, 64, 2
    n = height * width
    q = torch.randn(2, heads, n, head_dim, generator=g)
    k = torch.randn(2, heads, repeats * n, head_dim, generator=g)
    freqs = sam3_rope.compute_axial_cis(dim=head_dim, end_x=width, end_y=height)
    ref_q, ref_k = sam3_rope.apply_rotary_enc(q, k, freqs, repeat_freqs_k=repeats > 1)

    angles = axial_angles(grid_positions(height, width), head_dim)
    # Keys of `repeats` frames repeat the query grid's positions (upstream's repeat_freqs_k).
    ours_q = apply_rope(jnp.asarray(q.numpy()), angles)
    ours_k = apply_rope(jnp.asarray(k.numpy()), jnp.tile(angles, (repeats, 1)))
    upstream.report("rope q", ours_q, ref_q.numpy(), 1e-5)
    upstream.report(f"rope k x{repeats}", ours_k, ref_k.numpy(), 1e-5)


def test_zero_angle_is_exact_identity():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 3, 32)).astype(np.float32) * 100)
    out = apply_rope(x, jnp.zeros((7, 1, 16), jnp.float32))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_rope_keeps_dtype_and_norm():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 16, 64)), jnp.bfloat16)
    angles = axial_angles(grid_positions(4, 4), 64)
    out = apply_rope(x, angles)
    assert out.dtype == jnp.bfloat16
    pairs = lambda t: jnp.linalg.norm(t.astype(jnp.float32).reshape(1, 16, 32, 2), axis=-1)  # noqa: E731
    np.testing.assert_allclose(np.asarray(pairs(out)), np.asarray(pairs(x)), rtol=1e-2)
