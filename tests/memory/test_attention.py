"""The memory attention (`es3_jax.memory.attention`) against upstream `tracker.transformer.encoder`."""

import functools
import math
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from es3_jax.memory.attention import MemoryAttention, ProjectedMemory, select_layers
from es3_jax.memory.path import MemoryPath
from es3_jax.nn import attention
from es3_jax.nn.rope import axial_angles, grid_positions
from es3_jax.params import bind
from tests import upstream

torch = upstream.torch

pytestmark = pytest.mark.parity

PTR_TOKENS_PER_POINTER = 4  # a 256-d object pointer is split into 4 tokens of the 64-d memory width


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(upstream tracker, its `sam3.pt` params for `memory_attention`), weights drawn fresh."""
    _, tracker, _, params = upstream.ported_reference(tmp_path_factory.mktemp("ckpt"))
    return tracker, params["memory_attention"]


def _bind(params, num_layers: int = 4) -> MemoryAttention:
    return bind(lambda: MemoryAttention(num_layers, rngs=nnx.Rngs(0)), params, "memory_attention")


@functools.partial(nnx.jit, static_argnames=("query_grid", "num_frames", "num_ptr_tokens"))
def _ours(module, src, src_pos, memory, memory_pos, key_mask=None, *, query_grid, num_frames, num_ptr_tokens):
    angles = MemoryPath(module).key_angles(query_grid, num_frames, num_ptr_tokens)
    return module(
        src, src_pos, memory, memory_pos, query_grid=query_grid, key_angles=angles, key_mask=key_mask
    )


def _upstream(encoder, src, src_pos, memory, memory_pos, num_ptr_tokens: int) -> np.ndarray:
    """Batch-first torch inputs -> `[B, Nq, C]`, called as `_prepare_memory_conditioned_features` does."""
    with torch.no_grad():
        out = encoder(
            src=[src.transpose(0, 1)],
            src_key_padding_mask=[None],
            src_pos=[src_pos.transpose(0, 1)],
            prompt=memory.transpose(0, 1),
            prompt_pos=memory_pos.transpose(0, 1),
            prompt_key_padding_mask=None,
            num_obj_ptr_tokens=num_ptr_tokens,
        )
    return upstream.to_numpy(out["memory"].transpose(0, 1))


def _inputs(seed: int, batch: int, grid: int, num_frames: int, num_pointers: int):
    """Random torch (src, src_pos, memory, memory_pos), batch-first; memory = frames, then pointer tokens."""
    g = torch.Generator().manual_seed(seed)
    nq = grid * grid
    nk = num_frames * nq + PTR_TOKENS_PER_POINTER * num_pointers
    return (
        torch.randn(batch, nq, 256, generator=g),
        torch.randn(batch, nq, 256, generator=g),
        torch.randn(batch, nk, 64, generator=g),
        torch.randn(batch, nk, 64, generator=g),
    )


def _jax(*tensors):
    return tuple(jnp.asarray(t.numpy()) for t in tensors)


def test_raw_memory_key_angles_layout():
    """The teacher's keys: each frame rotated at the query grid's positions, pointers not at all."""
    angles = MemoryPath(MemoryAttention(1, 64, 64, 128, rngs=nnx.Rngs(0))).key_angles((3, 5), 2, 8)
    frame = axial_angles(grid_positions(3, 5), 64)
    assert angles.shape == (2 * 15 + 8, 32)
    np.testing.assert_array_equal(np.asarray(angles[:15]), np.asarray(frame))
    np.testing.assert_array_equal(np.asarray(angles[15:30]), np.asarray(frame))
    np.testing.assert_array_equal(np.asarray(angles[30:]), 0.0)


def test_reduced_grid_parity(teacher):
    tracker, params = teacher
    module = _bind(params)
    grid, frames, pointers = 16, 2, 2
    inputs = _inputs(upstream.fresh_seed(), 2, grid, frames, pointers)
    ref = _upstream(tracker.transformer.encoder, *inputs, PTR_TOKENS_PER_POINTER * pointers)
    ours = _ours(
        module,
        *_jax(*inputs),
        query_grid=(grid, grid),
        num_frames=frames,
        num_ptr_tokens=PTR_TOKENS_PER_POINTER * pointers,
    )
    upstream.report("memory attention 16x16, 2 frames + 2 pointers, B=2", ours, ref, 1e-5)


def test_full_size_parity(teacher):
    """The steady state of tracking: 72x72 queries, 7 memory frames + 16 pointers = 36,352 keys."""
    tracker, params = teacher
    module = _bind(params)
    grid, frames, pointers = 72, 7, 16
    inputs = _inputs(upstream.fresh_seed(), 1, grid, frames, pointers)
    assert inputs[2].shape[1] == 36_352

    start = time.perf_counter()
    ref = _upstream(tracker.transformer.encoder, *inputs, PTR_TOKENS_PER_POINTER * pointers)
    upstream_s = time.perf_counter() - start

    run = functools.partial(
        _ours,
        module,
        *_jax(*inputs),
        query_grid=(grid, grid),
        num_frames=frames,
        num_ptr_tokens=PTR_TOKENS_PER_POINTER * pointers,
    )
    start = time.perf_counter()
    ours = jax.block_until_ready(run())
    first_s = time.perf_counter() - start
    print(
        f"[timing] full-size memory attention: upstream {upstream_s:.1f} s, ours {first_s:.1f} s with compile"
    )
    upstream.report("memory attention 72x72, 7 frames + 16 pointers", ours, ref, 1e-4)


def test_select_layers_matches_upstream_subset(teacher):
    """A 2-layer stack initialised from teacher layers (0, 3) equals upstream running those two layers."""
    tracker, params = teacher
    module = _bind(select_layers(params, (0, 3)), num_layers=2)
    encoder = tracker.transformer.encoder
    full_layers = encoder.layers
    grid, frames, pointers = 8, 3, 1
    inputs = _inputs(upstream.fresh_seed(), 1, grid, frames, pointers)
    try:
        encoder.layers = torch.nn.ModuleList([full_layers[0], full_layers[3]])
        ref = _upstream(encoder, *inputs, PTR_TOKENS_PER_POINTER * pointers)
    finally:
        encoder.layers = full_layers
    ours = _ours(
        module,
        *_jax(*inputs),
        query_grid=(grid, grid),
        num_frames=frames,
        num_ptr_tokens=PTR_TOKENS_PER_POINTER * pointers,
    )
    upstream.report("memory attention, layers (0, 3) of 4", ours, ref, 1e-5)
    with pytest.raises(ValueError, match="not in the source stack"):
        select_layers(params, (0, 4))


def _largest_logit(module, *args, **kwargs) -> float:
    """The largest |logit| over the attended keys of every attention `module` computes, run eagerly."""
    seen = []
    attend = attention.attend

    def recording(q, k, v, *, bias=None, mask=None):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        if bias is not None:
            logits = logits + bias
        if mask is not None:
            logits = jnp.where(mask, logits, 0.0)
        seen.append(float(jnp.max(jnp.abs(logits))))
        return attend(q, k, v, bias=bias, mask=mask)

    with mock.patch.object(attention, "attend", recording):
        module(*args, **kwargs)
    return max(seen)


def _padded_bank(rng: np.random.Generator, grid: int, slots: int, ptr_slots: int):
    """(src, src_pos, bank `[2, B=2, Nk, 64]` (memory, positions), key_mask `[2, Nk]`), garbage in unused slots.

    Real memories are standard normal, the scale of the memory encoder's features and of the sine
    and temporal encodings added to them. Unused slots hold 100x that: masked exactly, they change
    nothing; leaked, they take over the softmax.
    """
    nq = grid * grid
    valid_frames = [(0, 2), (3,)]
    valid_pointers = [(1,), (0, 1, 2)]
    src, src_pos = (jnp.asarray(rng.standard_normal((2, nq, 256)), jnp.float32) for _ in range(2))
    frame_mask = np.zeros((2, slots, nq), bool)
    ptr_mask = np.zeros((2, ptr_slots, PTR_TOKENS_PER_POINTER), bool)
    for b in range(2):
        frame_mask[b, valid_frames[b]] = True
        ptr_mask[b, valid_pointers[b]] = True
    key_mask = np.concatenate([frame_mask.reshape(2, -1), ptr_mask.reshape(2, -1)], axis=1)
    bank = rng.standard_normal((2, 2, key_mask.shape[1], 64)).astype(np.float32)
    bank[:, ~key_mask] *= 100.0
    return src, src_pos, bank, key_mask


@pytest.mark.numerics
def test_padded_bank_masks_exactly(teacher):
    """A fixed-size bank (unused slots hold garbage, masked out) equals attention over the real keys alone.

    The two sum over different numbers of keys, so they agree to float32 rounding, amplified by the
    softmax in proportion to the largest logit: the tolerance is derived from that logit
    (`upstream.softmax_tolerance`). One garbage key left unmasked must break it by orders of magnitude.
    """
    _, params = teacher
    module = _bind(params)
    grid, slots, ptr_slots = 8, 4, 3
    src, src_pos, bank, key_mask = _padded_bank(
        np.random.default_rng(upstream.fresh_seed()), grid, slots, ptr_slots
    )
    shape = dict(query_grid=(grid, grid), num_frames=slots, num_ptr_tokens=ptr_slots * PTR_TOKENS_PER_POINTER)

    def padded(mask: np.ndarray) -> jax.Array:
        return _ours(
            module, src, src_pos, jnp.asarray(bank[0]), jnp.asarray(bank[1]), jnp.asarray(mask), **shape
        )

    angles = MemoryPath(module).key_angles(shape["query_grid"], slots, shape["num_ptr_tokens"])
    largest = _largest_logit(
        module,
        src,
        src_pos,
        jnp.asarray(bank[0]),
        jnp.asarray(bank[1]),
        query_grid=shape["query_grid"],
        key_angles=angles,
        key_mask=jnp.asarray(key_mask),
    )
    tol = upstream.softmax_tolerance(largest, reduction=256, layers=4)
    print(f"[conditioning] largest logit {largest:.1f} -> tolerance {tol:.1e}")

    out = padded(key_mask)
    for b in range(2):
        real = bank[:, b : b + 1, key_mask[b]]
        alone = _ours(
            module,
            src[b : b + 1],
            src_pos[b : b + 1],
            jnp.asarray(real[0]),
            jnp.asarray(real[1]),
            query_grid=shape["query_grid"],
            num_frames=int(key_mask[b, : slots * grid * grid].sum()) // (grid * grid),
            num_ptr_tokens=int(key_mask[b, slots * grid * grid :].sum()),
        )
        upstream.report(f"padded bank vs real keys only, element {b}", out[b : b + 1], alone, tol)

    leak = key_mask.copy()
    leak[0, np.flatnonzero(~key_mask[0])[0]] = True  # one garbage key of element 0 attended
    leaked = upstream.relative_error(padded(leak)[0], out[0])
    print(
        f"[planted leak] one garbage key unmasked: relative error {leaked:.1e}, {leaked / tol:.0e} x the tolerance"
    )
    assert leaked > 100 * tol, (
        f"one unmasked garbage key moved the output by only {leaked:.1e} (tolerance {tol:.1e})"
    )


@pytest.mark.numerics
def test_kv_transform_hook_sees_projected_memory(teacher):
    """The hook's k, v, bias and mask all reach the attention.

    Spatial keys duplicated with a -log 2 logit bias on both copies (pointers kept once, no bias)
    are the same attention; without the bias the spatial keys would weigh twice as much.
    """
    _, params = teacher
    module = _bind(select_layers(params, (2,)), num_layers=1)
    grid, frames, ptr_tokens = 8, 2, 4
    rng = np.random.default_rng(upstream.fresh_seed())
    src, src_pos = (jnp.asarray(rng.standard_normal((1, grid * grid, 256)), jnp.float32) for _ in range(2))
    nk = frames * grid * grid + ptr_tokens
    ns = nk - ptr_tokens
    memory, memory_pos = (jnp.asarray(rng.standard_normal((1, nk, 64)), jnp.float32) for _ in range(2))
    angles = MemoryPath(module).key_angles((grid, grid), frames, ptr_tokens)

    def duplicate_spatial(m: ProjectedMemory, log_weight: float = -math.log(2.0)) -> ProjectedMemory:
        assert m.bias is None and m.mask.shape == (1, nk) and m.k.shape[1] == nk

        def twice(t: jax.Array) -> jax.Array:
            return jnp.concatenate([t[:, :ns], t[:, :ns], t[:, ns:]], axis=1)

        bias = jnp.concatenate([jnp.full((1, 2 * ns), log_weight), jnp.zeros((1, ptr_tokens))], axis=1)
        return ProjectedMemory(twice(m.k), twice(m.v), bias, twice(m.mask))

    def mask_pointers(m: ProjectedMemory) -> ProjectedMemory:
        return m._replace(mask=m.mask.at[:, ns:].set(False))

    def call(memory, memory_pos, angles, transform=None):
        return module(
            src,
            src_pos,
            memory,
            memory_pos,
            query_grid=(grid, grid),
            key_angles=angles,
            key_mask=jnp.ones(memory.shape[:2], bool),
            kv_transform=transform,
        )

    plain = call(memory, memory_pos, angles)
    upstream.report(
        "spatial keys twice with -log 2 bias",
        call(memory, memory_pos, angles, duplicate_spatial),
        plain,
        upstream.REORDERED,
    )
    unbiased = call(memory, memory_pos, angles, functools.partial(duplicate_spatial, log_weight=0.0))
    assert upstream.relative_error(unbiased, plain) > 1e-4
    no_ptr = call(memory[:, :ns], memory_pos[:, :ns], angles[:ns])
    upstream.report(
        "hook-masked pointers vs no pointers",
        call(memory, memory_pos, angles, mask_pointers),
        no_ptr,
        upstream.REORDERED,
    )
