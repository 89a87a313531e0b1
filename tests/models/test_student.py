"""The student memory path (`es3_jax.models.student`): every config against its PyTorch twin, the
teacher as a special case, Eq. 5 pooling as repeated keys, and where the gradients go."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from es3_jax import config
from es3_jax.memory.attention import MemoryAttention, ProjectedMemory, pool_memory
from es3_jax.memory.path import MemoryPath
from es3_jax.models.student import student_from_config
from es3_jax.models.tracker import build_tracker
from es3_jax.nn.attention import attend
from es3_jax.params import flatten, param_dict
from tests import upstream

torch = upstream.torch
from porting.checkpoint_file import read_checkpoint  # noqa: E402
from porting.keymap import STUDENT_TABLE  # noqa: E402
from porting.sam3_checkpoint import port_state_dict  # noqa: E402
from porting.torch_student import torch_student_from_config, twin_state_dict  # noqa: E402

pytestmark = pytest.mark.parity

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STUDENT_CONFIGS = ("efficient_memory", "edgetam_like", "efficienttam_like", "efficient_memory_324")
GRID = 24
# Reduced 2-D latent grids at GRID = 24: 16×16 -> 4×4 (memory resized 24 -> 16, as 72 -> 64),
# 18×18 -> 6×6 (exact 4×4 windows, as on 72×72).
REDUCED_2D = {256: 16, 324: 36}
SLOTS, POINTER_TOKENS, BATCH = 3, 8, 2


def _config(name: str, *overrides: str) -> config.Config:
    cfg = config.load(CONFIGS / f"{name}.yaml")
    reduced = REDUCED_2D[cfg.MODEL.PERCEIVER.NUM_LATENTS_2D]
    return config.apply_overrides(cfg, ["MODEL.PERCEIVER.NUM_LATENTS_2D", str(reduced), *overrides])


def _bank_inputs(seed: int, grid: int):
    """Random (src, src_pos, frames_pos offsets, pointers, pointers_pos) and validity masks, torch."""
    g = torch.Generator().manual_seed(seed)
    nq = grid * grid
    return dict(
        src=torch.randn(BATCH, nq, 256, generator=g),
        src_pos=torch.randn(BATCH, nq, 256, generator=g),
        temporal=torch.randn(BATCH, SLOTS, 1, 64, generator=g),
        pointers=torch.randn(BATCH, POINTER_TOKENS, 64, generator=g),
        pointers_pos=torch.randn(BATCH, POINTER_TOKENS, 64, generator=g),
        frame_valid=torch.tensor([[True, True, False], [True, False, True]]),
        pointer_valid=torch.tensor([[True] * 8, [True] * 4 + [False] * 4]),
    )


def _jnp(t):
    return jnp.asarray(t.numpy())


@pytest.mark.parametrize("name", STUDENT_CONFIGS)
def test_student_matches_torch_twin(tmp_path, name):
    """Weights drawn in the twin, exported under `tracker.*`, read back by the production loader."""
    cfg = _config(name)
    seed = upstream.fresh_seed()
    twin = torch_student_from_config(cfg)
    upstream.randomize_(twin, seed)
    path = upstream.save_sam3_checkpoint(tmp_path / "student.pt", twin_state_dict(twin))
    student = student_from_config(cfg, port_state_dict(read_checkpoint(path)[0], table=STUDENT_TABLE).params)

    g = torch.Generator().manual_seed(seed + 1)
    features = torch.randn(BATCH * SLOTS, 64, GRID, GRID, generator=g)
    pos = torch.randn(BATCH * SLOTS, 64, GRID, GRID, generator=g)
    with torch.no_grad():
        tokens, tokens_pos = twin.compress(features, pos)
    ours_tokens, ours_pos = nnx.jit(lambda m, f, p: m.compress(f, p))(
        student, jnp.asarray(upstream.nchw_to_nhwc(features)), jnp.asarray(upstream.nchw_to_nhwc(pos))
    )
    upstream.report(f"{name}: compress vs torch twin", ours_tokens, upstream.to_numpy(tokens), 1e-5)
    upstream.report(
        f"{name}: compressed positions vs torch twin", ours_pos, upstream.to_numpy(tokens_pos), 1e-5
    )

    n = tokens.shape[1]
    x = _bank_inputs(seed + 2, GRID)
    frames = tokens.reshape(BATCH, SLOTS, n, 64)
    frames_pos = tokens_pos.reshape(BATCH, SLOTS, n, 64) + x["temporal"]
    args = dict(
        frames=frames,
        frames_pos=frames_pos,
        frame_valid=x["frame_valid"],
        pointers=x["pointers"],
        pointers_pos=x["pointers_pos"],
        pointer_valid=x["pointer_valid"],
    )
    with torch.no_grad():
        ref = twin(x["src"], x["src_pos"], (GRID, GRID), *args.values())
    call = nnx.jit(lambda m, src, src_pos, a: m(src, src_pos, query_grid=(GRID, GRID), **a))
    ours = call(student, _jnp(x["src"]), _jnp(x["src_pos"]), {k: _jnp(v) for k, v in args.items()})
    upstream.report(f"{name}: memory attention vs torch twin, B=2", ours, upstream.to_numpy(ref), 1e-5)


def test_student_without_compression_is_the_teacher(tmp_path):
    """Perceiver off, pooling 1, the teacher's 4 layers: bit-identical to the tracker's own memory path."""
    _, _, _, params = upstream.ported_reference(tmp_path)
    cfg = _config(
        "efficient_memory",
        *("MODEL.PERCEIVER.ENABLED", "False", "MODEL.MEMORY_ATTENTION.POOL_SIZE", "1"),
        *("MODEL.MEMORY_ATTENTION.NUM_LAYERS", "4"),
    )
    student = student_from_config(cfg, {"memory_attention": params["memory_attention"]})
    teacher = build_tracker(cfg.MODEL.TEACHER, params).memory_path()
    grid = 8
    x = _bank_inputs(upstream.fresh_seed(), grid)
    g = torch.Generator().manual_seed(1)
    features = jnp.asarray(np.asarray(torch.randn(BATCH * SLOTS, grid, grid, 64, generator=g)))
    pos = jnp.asarray(np.asarray(torch.randn(BATCH * SLOTS, grid, grid, 64, generator=g)))
    (st, sp), (tt, tp) = student.compress(features, pos), teacher.compress(features, pos)
    np.testing.assert_array_equal(np.asarray(st), np.asarray(tt))
    np.testing.assert_array_equal(np.asarray(sp), np.asarray(tp))
    bank = dict(
        query_grid=(grid, grid),
        frames=tt.reshape(BATCH, SLOTS, -1, 64),
        frames_pos=tp.reshape(BATCH, SLOTS, -1, 64) + _jnp(x["temporal"]),
        frame_valid=_jnp(x["frame_valid"]),
        pointers=_jnp(x["pointers"]),
        pointers_pos=_jnp(x["pointers_pos"]),
        pointer_valid=_jnp(x["pointer_valid"]),
    )
    ours = student(_jnp(x["src"]), _jnp(x["src_pos"]), **bank)
    ref = teacher(_jnp(x["src"]), _jnp(x["src_pos"]), **bank)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


@pytest.mark.numerics
def test_eq5_pooling_is_attention_over_repeated_pooled_keys():
    """Property test over random layouts: Eq. 5 (pooled keys + log p² logits) equals plain attention
    over every pooled key/value repeated p² times; pooled tokens are the cell means."""
    rng = np.random.default_rng(upstream.fresh_seed())
    for _ in range(6):
        b, heads, dh = int(rng.integers(1, 3)), int(rng.choice([1, 2])), int(rng.choice([4, 8]))
        p = int(rng.choice([2, 3]))
        gh, gw = p * int(rng.integers(1, 4)), p * int(rng.integers(1, 4))
        prefix, s, ptr, nq = (int(rng.integers(lo, hi)) for lo, hi in ((0, 5), (1, 4), (0, 6), (1, 9)))
        per_frame = prefix + gh * gw
        nk = s * per_frame + ptr
        q, k, v = (rng.standard_normal((b, n, heads, dh)).astype(np.float32) for n in (nq, nk, nk))
        frame_valid = rng.random((b, s)) < 0.7
        frame_valid[:, 0] = True
        mask = np.concatenate([np.repeat(frame_valid, per_frame, axis=1), rng.random((b, ptr)) < 0.5], axis=1)

        pooled = pool_memory(
            ProjectedMemory(jnp.asarray(k), jnp.asarray(v), None, jnp.asarray(mask)),
            num_frames=s,
            prefix=prefix,
            grid=(gh, gw),
            pool=p,
        )
        cells = k[:, :per_frame][:, prefix:].reshape(b, gh // p, p, gw // p, p, heads, dh).mean(axis=(2, 4))
        np.testing.assert_allclose(
            np.asarray(pooled.k[:, prefix : prefix + cells.shape[1] * cells.shape[2]]),
            cells.reshape(b, -1, heads, dh),
            rtol=1e-6,
            atol=1e-6,
        )
        eq5 = attend(
            jnp.asarray(q),
            pooled.k,
            pooled.v,
            bias=pooled.bias[None, None, None],
            mask=pooled.mask[:, None, None],
        )

        # Surrogate: every pooled grid token repeated p² times in place, no bias.
        n_pooled = gh * gw // (p * p)
        counts = np.tile(np.r_[np.ones(prefix, int), np.full(n_pooled, p * p)], s)
        counts = np.r_[counts, np.ones(ptr, int)]
        np.testing.assert_allclose(
            np.asarray(pooled.bias), np.log(counts).astype(np.float32), rtol=1e-6, atol=0
        )
        rk, rv, rm = (np.repeat(np.asarray(t), counts, axis=1) for t in (pooled.k, pooled.v, pooled.mask))
        full = attend(jnp.asarray(q), jnp.asarray(rk), jnp.asarray(rv), mask=jnp.asarray(rm)[:, None, None])
        err = upstream.report(
            f"Eq. 5 vs repeated keys (p={p}, grid={gh}x{gw}, prefix={prefix})", eq5, full, upstream.REORDERED
        )
    print(f"[parity] Eq. 5 pooled attention vs p²-repeated keys: last relative error {err:.2e}")


def test_gradients_reach_every_student_parameter_and_no_teacher_parameter():
    """A distillation-style loss: the student (initialised from teacher layers 0 and 3) regresses
    the teacher's conditioned features. Every student parameter gets a finite non-zero gradient;
    an SGD step on the student moves all of them and leaves every teacher parameter as it was."""
    grid = 8
    cfg = _config(
        "efficient_memory",
        *("MODEL.MEMORY_ATTENTION.INIT_FROM_TEACHER_LAYERS", "[0, 3]", "MODEL.PERCEIVER.NUM_LATENTS", "16"),
    )
    teacher = MemoryPath(MemoryAttention(4, rngs=nnx.Rngs(7)))
    teacher_before = jax.tree.map(np.array, param_dict(teacher.memory_attention))
    student = student_from_config(cfg, teacher_params=teacher_before, seed=3)
    student_params = param_dict(student)
    for ours, theirs in ((0, 0), (1, 3)):
        for path, value in flatten(student_params["memory_attention"]["layers"][ours]).items():
            np.testing.assert_array_equal(value, flatten(teacher_before["layers"][theirs])[path])

    rng = np.random.default_rng(upstream.fresh_seed())
    features, pos = (jnp.asarray(rng.standard_normal((BATCH, grid, grid, 64)), jnp.float32) for _ in range(2))
    src, src_pos = (
        jnp.asarray(rng.standard_normal((BATCH, grid * grid, 256)), jnp.float32) for _ in range(2)
    )
    pointers = jnp.asarray(rng.standard_normal((BATCH, POINTER_TOKENS, 64)), jnp.float32)
    valid = dict(
        frame_valid=jnp.ones((BATCH, 1), bool), pointer_valid=jnp.ones((BATCH, POINTER_TOKENS), bool)
    )

    def conditioned(memory, feats):
        tokens, tokens_pos = memory.compress(feats, pos)
        return memory(
            src,
            src_pos,
            query_grid=(grid, grid),
            frames=tokens[:, None],
            frames_pos=tokens_pos[:, None],
            pointers=pointers,
            pointers_pos=jnp.zeros_like(pointers),
            **valid,
        )

    target = conditioned(teacher, features)

    def loss(model: MemoryPath) -> jax.Array:
        return jnp.mean((conditioned(model, features) - target) ** 2)

    grads = nnx.jit(nnx.grad(loss))(student)
    flat = flatten(nnx.to_pure_dict(grads))
    assert set(flat) == set(flatten(student_params))
    dead = [p for p, g in flat.items() if not (np.isfinite(g).all() and np.abs(g).max() > 0)]
    assert not dead, f"no gradient reaches {dead}"

    state = nnx.state(student, nnx.Param)
    nnx.update(student, jax.tree.map(lambda w, g: w - 0.1 * g, state, grads))
    moved = flatten(param_dict(student))
    assert all(not np.array_equal(moved[p], v) for p, v in flatten(student_params).items())
    after = flatten(param_dict(teacher.memory_attention))
    assert all(np.array_equal(after[p], v) for p, v in flatten(teacher_before).items())
    assert math.isfinite(float(loss(student)))


def test_config_errors_name_the_key():
    with pytest.raises(config.ConfigError, match="NUM_LATENTS_2D"):
        student_from_config(_config("efficient_memory", "MODEL.PERCEIVER.NUM_LATENTS_2D", "15"))
    with pytest.raises(config.ConfigError, match="POOL_SIZE"):
        student_from_config(_config("efficient_memory", "MODEL.MEMORY_ATTENTION.POOL_SIZE", "3"))
    with pytest.raises(config.ConfigError, match="INIT_FROM_TEACHER_LAYERS"):
        student_from_config(
            _config("efficient_memory", "MODEL.MEMORY_ATTENTION.INIT_FROM_TEACHER_LAYERS", "[0]")
        )
