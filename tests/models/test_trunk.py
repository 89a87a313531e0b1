"""Parity of the SAM3 ViT trunk with upstream sam3 (`sam3/model/vitdet.py`), weights through `port_trunk`."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from es3_jax import config as config_lib
from es3_jax.cli import main
from es3_jax.models.trunk import ViTTrunk, trunk_fingerprint, trunk_from_config
from es3_jax.params import ParamMismatchError, abstract_shapes, bind, flatten, param_dict
from tests import upstream

torch = upstream.torch

from porting.checkpoint_file import CheckpointError, read_checkpoint  # noqa: E402
from porting.sam3_checkpoint import TRUNK_PREFIX, port_trunk  # noqa: E402

build_trunk = pytest.importorskip("porting.upstream").build_trunk

pytestmark = pytest.mark.parity

# A small trunk that still exercises every branch: a 112 px frame is an 8×8 grid, 3×3 windows
# need zero padding (8 -> 9), the 3×3 pretraining table is tiled over 8×8, and the block after the
# last global one does not contribute (upstream returns the last global block's output).
SMALL = dict(img_size=112, depth=3, global_blocks=(1,), window_size=3, pretrain_img_size=42)
SMALL_DIMS = dict(embed_dim=64, num_heads=4, mlp_dim=128)
# A small trunk as config overrides (4×4 windows, no padding, two global blocks).
SMALL_OVERRIDES = [
    "MODEL.TEACHER.IMAGE_SIZE", "112",
    "MODEL.TEACHER.TRUNK_DIM", "64",
    "MODEL.TRUNK.WIDTH", "64",
    "MODEL.TRUNK.DEPTH", "3",
    "MODEL.TRUNK.NUM_HEADS", "4",
    "MODEL.TRUNK.MLP_DIM", "128",
    "MODEL.TRUNK.WINDOW_SIZE", "4",
    "MODEL.TRUNK.GLOBAL_BLOCKS", "[1,2]",
    "MODEL.TRUNK.PRETRAIN_IMAGE_SIZE", "56",
]  # fmt: skip
FULL_DIMS = dict(window_size=24, pretrain_img_size=336, embed_dim=1024, num_heads=16, mlp_dim=4736)


def sam3_layout(trunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trunk's state dict under its sam3.pt prefix."""
    return {TRUNK_PREFIX + k: v.detach() for k, v in trunk.state_dict().items()}


def es3_factory(
    img_size, depth, global_blocks, window_size, pretrain_img_size, embed_dim, num_heads, mlp_dim
):
    return lambda: ViTTrunk(
        img_size,
        14,
        embed_dim,
        depth,
        num_heads,
        mlp_dim,
        window_size,
        global_blocks,
        pretrain_img_size,
        rngs=nnx.Rngs(0),
    )


def upstream_and_ours(tmp_path, seed: int, batch: int, **geometry) -> tuple[np.ndarray, np.ndarray, dict]:
    """Upstream's output on a random batch, then ours with its weights saved as sam3.pt and read back
    through the production loader (the torch model is freed first: the full trunk is 1.8 GB a copy).

    Returns (ours, upstream) as `[B, h, w, C]` and the seconds each side's forward took.
    """
    trunk = build_trunk(seed, **geometry)
    size = geometry["img_size"]
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    with torch.no_grad():
        (ref,) = trunk(x)
    seconds = {"torch": time.perf_counter() - start}
    path = upstream.save_sam3_checkpoint(tmp_path / "sam3.pt", sam3_layout(trunk))
    del trunk
    factory = es3_factory(**geometry)
    ours = bind(factory, port_trunk(read_checkpoint(path)[0], expected=abstract_shapes(factory)))
    start = time.perf_counter()
    out = jax.block_until_ready(
        jax.jit(lambda m, images: m(images))(ours, jnp.asarray(upstream.nchw_to_nhwc(x)))
    )
    seconds["jax (with compile)"] = time.perf_counter() - start
    return np.asarray(out), upstream.nchw_to_nhwc(ref), seconds


def test_full_geometry_reduced_depth_matches_upstream(tmp_path):
    """1008 px, 72×72 tokens, 24×24 windows, pos-embed tiled 3×3, block 0 windowed, block 1 global."""
    out, ref, _ = upstream_and_ours(
        tmp_path, upstream.fresh_seed(), 1, img_size=1008, depth=2, global_blocks=(1,), **FULL_DIMS
    )
    assert out.shape == (1, 72, 72, 1024) and out.dtype == np.float32
    upstream.report("trunk 1008 px, depth 2 (window + global)", out, ref, 1e-4)


def test_small_trunk_with_window_padding_matches_upstream(tmp_path):
    out, ref, _ = upstream_and_ours(tmp_path, upstream.fresh_seed(), 2, **SMALL, **SMALL_DIMS)
    assert out.shape == (2, 8, 8, 64)
    upstream.report("trunk 112 px, 3×3 windows padded, tiled 3×3 pos table", out, ref, 1e-5)


@pytest.mark.slow
def test_full_sam3_trunk_matches_upstream(tmp_path):
    """All 32 blocks at 1008 px: a few minutes on 2 CPU cores, about 8 GB of memory."""
    out, ref, seconds = upstream_and_ours(
        tmp_path,
        upstream.fresh_seed(),
        1,
        img_size=1008,
        depth=32,
        global_blocks=(7, 15, 23, 31),
        **FULL_DIMS,
    )
    print("[trunk] full 32-block frame: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    upstream.report("trunk 1008 px, all 32 blocks", out, ref, 1e-4)


def to_transformers_layout(trunk: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """An upstream ViT's weights in transformers' `Sam3ViTModel` naming (written independently of the port)."""
    out = {}
    for key, value in trunk.state_dict().items():
        if key.endswith("freqs_cis"):
            continue
        if key == "pos_embed":
            out["embeddings.position_embeddings"] = value[:, 1:]
            continue
        if key == "patch_embed.proj.weight":
            out["embeddings.patch_embeddings.projection.weight"] = value
            continue
        if key.startswith("ln_pre."):
            out[key.replace("ln_pre.", "layer_norm.")] = value
            continue
        _, i, *rest = key.split(".")
        name = ".".join(rest)
        if name.startswith("attn.qkv."):
            leaf = name.rsplit(".", 1)[1]
            for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[f"layers.{i}.attention.{part}_proj.{leaf}"] = chunk
            continue
        name = (
            name.replace("norm1.", "layer_norm1.")
            .replace("norm2.", "layer_norm2.")
            .replace("attn.proj.", "attention.o_proj.")
        )
        out[f"layers.{i}.{name}"] = value
    return {prefix + k: v.detach().clone() for k, v in out.items()}


def test_transformers_layout_ports_to_the_same_params():
    """transformers' own ViT, loaded strictly with that layout, computes what upstream does; port_trunk
    reads the transformers layout into the very same parameters as the sam3.pt layout."""
    from transformers.models.sam3.configuration_sam3 import Sam3ViTConfig
    from transformers.models.sam3.modeling_sam3 import Sam3ViTModel

    seed = upstream.fresh_seed()
    trunk = build_trunk(seed, **SMALL, **SMALL_DIMS)
    hf = Sam3ViTModel(
        Sam3ViTConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,  # the third upstream block does not contribute
            num_attention_heads=4,
            image_size=112,
            patch_size=14,
            window_size=3,
            global_attn_indexes=[1],
            pretrain_image_size=42,
            layer_norm_eps=1e-5,  # sam3's ViT; transformers defaults to 1e-6
        )
    ).eval()
    layout = to_transformers_layout(trunk, "")
    hf.load_state_dict({k: v for k, v in layout.items() if not k.startswith("layers.2.")}, strict=True)
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        (ref,) = trunk(x)
        hf_out = hf(x).last_hidden_state.reshape(1, 8, 8, 64)
    upstream.report(
        "transformers Sam3ViTModel vs sam3 ViT (layout check)",
        hf_out.numpy(),
        upstream.nchw_to_nhwc(ref),
        1e-5,
    )

    from_sam3 = port_trunk({k: v.numpy() for k, v in sam3_layout(trunk).items()})
    for prefix in ("vision_encoder.backbone.", "detector_model.vision_encoder.backbone."):
        from_hf = port_trunk({k: v.numpy() for k, v in to_transformers_layout(trunk, prefix).items()})
        assert trunk_fingerprint(from_hf) == trunk_fingerprint(from_sam3)
        assert jax.tree.all(jax.tree.map(np.array_equal, from_hf, from_sam3))


@pytest.fixture(scope="module")
def small_sd():
    trunk = build_trunk(upstream.fresh_seed(), **SMALL, **SMALL_DIMS)
    return {k: v.numpy() for k, v in sam3_layout(trunk).items()}  # freqs_cis stay complex


def test_port_infers_the_geometry_and_fits_the_module(small_sd):
    params = port_trunk(small_sd)  # no `expected`: depth, widths and grid come from the tensors
    factory = es3_factory(**SMALL, **SMALL_DIMS)
    assert set(flatten(params)) == set(abstract_shapes(factory))
    bind(factory, params)
    assert params["pos_embed"].shape == (1, 9, 64)  # the class-token row is dropped
    np.testing.assert_array_equal(params["pos_embed"][0], small_sd[TRUNK_PREFIX + "pos_embed"][0, 1:])


def test_trunk_key_table_maps_every_upstream_key_both_ways(small_sd):
    from porting.keymap import TRUNK_TABLE

    for key, value in small_sd.items():
        if key.endswith(".attn.freqs_cis"):
            assert TRUNK_TABLE.is_ignored(key) and value.dtype == np.complex64
            continue
        path, transform = TRUNK_TABLE.to_jax(key)
        assert TRUNK_TABLE.to_torch(path)[0] == key
        back = transform.to_torch(transform.to_jax(value))
        if key.endswith("pos_embed"):  # the unused class-token row comes back as zeros
            assert not back[:, 0].any()
            back, value = back[:, 1:], value[:, 1:]
        assert back.tobytes() == value.tobytes(), key


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda sd: sd.pop(TRUNK_PREFIX + "blocks.1.mlp.fc2.bias"),
            "missing key: " + TRUNK_PREFIX + "blocks.1.mlp.fc2.bias",
        ),
        (
            lambda sd: sd.__setitem__(
                TRUNK_PREFIX + "blocks.0.attn.rel_pos_h", np.zeros((5, 16), np.float32)
            ),
            "unexpected key: " + TRUNK_PREFIX + "blocks.0.attn.rel_pos_h",
        ),
        (
            lambda sd: sd.__setitem__(TRUNK_PREFIX + "blocks.0.norm2.weight", np.ones((63,), np.float32)),
            "shape mismatch: " + TRUNK_PREFIX + "blocks.0.norm2.weight: shape (63,), expected (64,)",
        ),
        (
            lambda sd: sd.__setitem__(TRUNK_PREFIX + "pos_embed", np.ones((1, 17, 64), np.float32)),
            "shape mismatch: " + TRUNK_PREFIX + "pos_embed: shape (1, 17, 64), expected (1, 10, 64)",
        ),
    ],
)
def test_bad_trunk_keys_are_named(small_sd, edit, message):
    sd = dict(small_sd)
    edit(sd)
    with pytest.raises(ParamMismatchError, match="trunk does not match") as info:
        port_trunk(sd, expected=abstract_shapes(es3_factory(**SMALL, **SMALL_DIMS)))
    assert message in str(info.value)


def test_checkpoints_without_a_sam3_trunk_are_refused(small_sd, tmp_path):
    tracker_only = {"tracker.no_mem_embed": np.zeros((1, 1, 256), np.float32)}
    with pytest.raises(CheckpointError, match="no trunk in this checkpoint"):
        port_trunk(tracker_only)
    # A stage-1 merged checkpoint: a student backbone under the trunk prefix.
    student = {
        TRUNK_PREFIX + f"model.backbone.stages.{s}.blocks.{b}.conv.weight": np.zeros((8, 8, 3, 3), np.float32)
        for s in range(2)
        for b in range(3)
    }
    student[TRUNK_PREFIX + "model.head.0.weight"] = np.zeros((1024, 8, 1, 1), np.float32)
    path = upstream.save_sam3_checkpoint(
        tmp_path / "merged.pt", {k: torch.from_numpy(v) for k, v in student.items()}
    )
    with pytest.raises(CheckpointError, match=r"merged\.pt: the trunk is not SAM3.s ViT .*stage-1 student"):
        port_trunk(read_checkpoint(path)[0], source=str(path))


def test_trunk_from_config_and_fingerprint():
    cfg = config_lib.load(overrides=SMALL_OVERRIDES)
    trunk = trunk_from_config(cfg, seed=3)
    params = param_dict(trunk)
    assert trunk_fingerprint(params) == trunk_fingerprint(param_dict(trunk_from_config(cfg, seed=3)))
    assert trunk_fingerprint(params) != trunk_fingerprint(param_dict(trunk_from_config(cfg, seed=4)))
    bound = trunk_from_config(cfg, params)
    images = jax.random.normal(jax.random.key(0), (2, 112, 112, 3))
    np.testing.assert_array_equal(bound(images), trunk(images))
    assert trunk(images).shape == (2, 8, 8, 64)
    bf16 = trunk_from_config(cfg, params, dtype=jnp.bfloat16)(images)
    assert bf16.dtype == jnp.float32
    assert upstream.relative_error(bf16, trunk(images)) < 5e-2
    with pytest.raises(ValueError, match=r"images \[B, 112, 112, 3\]"):
        trunk(images[:, :56])


def test_config_refuses_a_trunk_width_the_tracker_does_not_read():
    with pytest.raises(
        config_lib.ConfigError, match=r"MODEL\.TRUNK\.WIDTH \(512\).*MODEL\.TEACHER\.TRUNK_DIM \(1024\)"
    ):
        config_lib.load(overrides=["MODEL.TRUNK.WIDTH", "512"])
    with pytest.raises(config_lib.ConfigError, match=r"MODEL\.TRUNK\.GLOBAL_BLOCKS"):
        config_lib.load(overrides=["MODEL.TRUNK.DEPTH", "8"])


def test_bench_embed_times_both_frameworks(tmp_path, capsys):
    out = tmp_path / "embed.jsonl"
    args = ["bench", "embed", "--trunks", "sam3_vit,repvit_m0_9", "--depth", "2", "--repeats", "1",
            "--batch_size", "2", "--output", str(out)]  # fmt: skip
    assert main([*args, *SMALL_OVERRIDES]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["trunk"], r["framework"].split()[0]) for r in records] == [
        ("sam3_vit (depth 2)", "jax"), ("sam3_vit (depth 2)", "torch"), ("repvit_m0_9", "jax"), ("repvit_m0_9", "torch")
    ]  # fmt: skip
    for r in records:
        assert (
            (r["image_size"], r["batch"]) == (112, 2) and r["frames_per_s"] > 0 and r["gflops_per_frame"] > 0
        )
        assert r["speed_vs_vit"] > 0 and r["flops_vs_vit"] > 0
    assert records[0]["speed_vs_vit"] == records[0]["flops_vs_vit"] == 1.0
    assert "frames_per_s" in capsys.readouterr().out
