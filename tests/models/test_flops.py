"""The FLOP and parameter account (`es3_jax.models.flops`) against XLA's count and upstream's modules."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from es3_jax import config
from es3_jax.memory.attention import MemoryAttention
from es3_jax.memory.encoder import MemoryEncoder
from es3_jax.memory.path import MemoryPath
from es3_jax.models.flops import memory_path_cost, total, trunk_cost
from es3_jax.models.student import student_from_config
from es3_jax.models.trunk import trunk_from_config
from es3_jax.nn import attention
from es3_jax.nn.blocked_attention import Blocks
from es3_jax.params import abstract_shapes

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GRID, FRAMES, POINTER_TOKENS = 16, 7, 64


# Reduced 2-D latent grids on the 16×16 test map: 16×16 -> 4×4, 18×18 -> 6×6 (resized to 24×24).
REDUCED_2D = {256: 16, 324: 36}


def _config(name: str) -> config.Config:
    cfg = config.load(CONFIGS / f"{name}.yaml")
    reduced = REDUCED_2D[cfg.MODEL.PERCEIVER.NUM_LATENTS_2D]
    return config.apply_overrides(cfg, ["MODEL.PERCEIVER.NUM_LATENTS_2D", str(reduced)])


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


@pytest.mark.parametrize(
    "name", ["teacher", "efficient_memory", "edgetam_like", "efficienttam_like", "efficient_memory_324"]
)
def test_memory_attention_flops_match_xla(name, monkeypatch):
    """Our count leaves out softmax, norms and RoPE: XLA's count is at most 3% above it.

    XLA's cost analysis counts a loop's body once, so the attention core runs as one block here
    (the same arithmetic as its blocks in a loop)."""
    monkeypatch.setitem(attention.BLOCKS, "cpu", Blocks(q=2**20, k=2**20))
    cfg = _config("efficient_memory" if name == "teacher" else name)
    costs = memory_path_cost(cfg, teacher=name == "teacher", grid=GRID)
    if name == "teacher":
        module, tokens = MemoryPath(MemoryAttention(4, rngs=nnx.Rngs(0))), GRID * GRID
    else:
        module = student_from_config(cfg)
        tokens = module.compress(jnp.zeros((1, GRID, GRID, 64)), jnp.zeros((1, GRID, GRID, 64)))[0].shape[1]
    graphdef, state = nnx.split(module)

    def step(state, src, frames, pointers):
        return nnx.merge(graphdef, state)(
            src,
            src,
            query_grid=(GRID, GRID),
            frames=frames,
            frames_pos=frames,
            frame_valid=jnp.ones((1, FRAMES), bool),
            pointers=pointers,
            pointers_pos=pointers,
            pointer_valid=jnp.ones((1, POINTER_TOKENS), bool),
        )

    xla = _xla_flops(
        step,
        state,
        jnp.zeros((1, GRID * GRID, 256)),
        jnp.zeros((1, FRAMES, tokens, 64)),
        jnp.zeros((1, POINTER_TOKENS, 64)),
    )
    ours = total(costs, "memory_attention").flops
    print(f"[flops] {name} memory attention: ours {ours / 1e9:.3f} GFLOP, XLA {xla / 1e9:.3f}")
    assert 1.0 <= xla / ours <= 1.03


def test_encoder_and_perceiver_flops_match_xla():
    """Small maps: elementwise work (norms, GELU) is up to 20% of XLA's count here."""
    cfg = _config("efficient_memory")
    costs = memory_path_cost(cfg, grid=GRID)
    encoder_def, encoder = nnx.split(MemoryEncoder(rngs=nnx.Rngs(0)))
    xla = _xla_flops(
        lambda s, pix, mask: nnx.merge(encoder_def, s)(pix, mask),
        encoder,
        jnp.zeros((1, GRID, GRID, 256)),
        jnp.zeros((1, 16 * GRID, 16 * GRID, 1)),
    )
    assert 1.0 <= xla / costs["memory_encoder"].flops <= 1.2
    perceiver_def, perceiver = nnx.split(student_from_config(cfg).spatial_perceiver)
    xla = _xla_flops(
        lambda s, f: nnx.merge(perceiver_def, s)(f, f), perceiver, jnp.zeros((1, GRID, GRID, 64))
    )
    assert 1.0 <= xla / costs["perceiver"].flops <= 1.2


def test_steady_state_geometry_and_parameter_counts():
    cfg = config.load(CONFIGS / "efficient_memory.yaml")
    teacher = memory_path_cost(cfg, teacher=True)
    student = memory_path_cost(cfg)
    # 4 layers × (logits + weighted sum) of 5184 queries over 7·5184 + 16·4 = 36,352 keys at width 256.
    assert teacher["memory_attention.cross_attention"].flops == 4 * 4 * 5184 * 36_352 * 256
    # 2 layers over 7 × (256 global + 8×8 pooled latents) + 64 pointer tokens.
    assert student["memory_attention.cross_attention"].flops == 2 * 4 * 5184 * (7 * 320 + 64) * 256
    assert student["perceiver"].params == 230_784  # EdgeTAM's spatial_perceiver


def test_parameter_counts_match_upstream():
    from tests import upstream

    tracker = upstream.build_tracker(0)
    cfg = config.load(CONFIGS / "efficient_memory.yaml")
    teacher = memory_path_cost(cfg, teacher=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert total(teacher, "memory_attention").params == count(tracker.transformer.encoder)
    assert teacher["memory_encoder"].params == count(tracker.maskmem_backbone)


def _vit_flops(cfg: config.Config) -> float:
    """SAM3's ViT by hand: patch conv, then every block up to the last global one: MLP over the grid,
    and attention (qkv, products, proj) over the whole grid or within windows of the grid
    zero-padded to whole windows (the padded tokens are projected and attended too)."""
    t, size = cfg.MODEL.TRUNK, cfg.MODEL.TEACHER.IMAGE_SIZE
    g, d, w = size // t.PATCH_SIZE, t.WIDTH, t.WINDOW_SIZE
    blocks = max(t.GLOBAL_BLOCKS) + 1
    flops = 2 * g * g * t.PATCH_SIZE**2 * 3 * d
    padded = -(-g // w) * w
    for i in range(blocks):
        tokens = g * g if i in t.GLOBAL_BLOCKS else padded * padded
        flops += 2 * g * g * d * 2 * t.MLP_DIM + 2 * tokens * d * 4 * d
        flops += 4 * g**4 * d if i in t.GLOBAL_BLOCKS else 4 * padded**2 * w * w * d
    return flops


def test_trunk_flops_of_the_vit_match_a_count_by_hand():
    cfg = config.load(CONFIGS / "tiny.yaml", ["MODEL.TRUNK.DEPTH", "3", "MODEL.TRUNK.GLOBAL_BLOCKS", "[1]",
                                              "MODEL.TRUNK.WINDOW_SIZE", "6"])  # fmt: skip
    cost = trunk_cost(cfg)
    assert cost.flops == _vit_flops(cfg)  # 16×16 grid, 6×6 windows padded to 18×18, 2 of 3 blocks run
    assert cost.params == sum(math.prod(s) for s in abstract_shapes(lambda: trunk_from_config(cfg)).values())


# EfficientViT's linear attention normalises by q·Σk: timm multiplies by a column of ones padded onto
# v (2·N·d more per head and scale), es3 sums k (a reduction, not counted): 0.05% fewer FLOPs.
TRUNK_FLOPS_RTOL = {"repvit_m1_1": 1e-9, "tiny_vit_11m": 1e-9, "efficientvit_b1": 1e-3}


@pytest.mark.parametrize("kind", list(TRUNK_FLOPS_RTOL))
def test_stage1_trunk_flops_match_torchs_count_of_timms_model(kind):
    """Counted from the JAX program = counted by torch's FlopCounterMode on timm's model of the same
    architecture with the same head (both: 2 × multiply-accumulates of convolutions and matmuls)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    from torch.utils.flop_counter import FlopCounterMode

    from porting.stage1_checkpoint import timm_stage1_trunk

    size = 256
    cfg = config.load(
        CONFIGS / "tiny.yaml", ["MODEL.TEACHER.IMAGE_SIZE", str(size), "MODEL.TRUNK.KIND", kind]
    )
    grid = size // cfg.MODEL.TEACHER.BACKBONE_STRIDE
    model = timm_stage1_trunk(kind, grid, cfg.MODEL.TEACHER.TRUNK_DIM)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    ours = trunk_cost(cfg)
    theirs = counter.get_total_flops()
    print(f"[flops] {kind} at {size} px: ours {ours.flops / 1e9:.4f} GFLOP, torch {theirs / 1e9:.4f}")
    assert ours.flops == pytest.approx(theirs, rel=TRUNK_FLOPS_RTOL[kind])
    # timm keeps its classifier's pre-logits layers even headless; upstream's trunk has none.
    trunk_params = (
        p.numel() for name, p in model.named_parameters() if not name.startswith("backbone.head.")
    )
    assert ours.params == sum(trunk_params)
