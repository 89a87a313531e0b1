"""Trunk throughput: frames/s of the JAX SAM3 ViT beside the upstream PyTorch ViT, same geometry and batch.

The JAX trunk is jit-compiled and warmed, in the config's compute dtype (`MODEL.COMPUTE_DTYPE`: auto is
bfloat16 on accelerators, float32 on CPU). The PyTorch trunk is sam3's `ViT` with the same weights'
shapes (random), in eval mode under `torch.inference_mode`, float32 on CPU and bfloat16 autocast on
CUDA (as SAM3's predictor runs it). `--depth` shortens both (global blocks: SAM3's below that depth,
or the last block) for a quick CPU run.
"""

from __future__ import annotations

import argparse
import dataclasses

from benchmarks.harness import block, time_call
from es3_jax.commands.common import add_config_args, load_config
from es3_jax.config import validate
from es3_jax.errors import Es3Error

HELP = "trunk: frames/s of the JAX ViT (jit, warmed) beside the upstream PyTorch ViT"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch_size", type=int, default=1, help="frames per trunk call")
    p.add_argument("--depth", type=int, default=None, help="blocks to run; none: all of MODEL.TRUNK.DEPTH")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per framework")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (compilation, caches)")
    p.add_argument("--frameworks", default="jax,torch", help="comma-separated subset of jax,torch to measure")
    add_config_args(p)


def _geometry(cfg, depth: int | None):
    """The config with the trunk shortened to `depth` blocks, its global blocks kept inside."""

    t = cfg.MODEL.TRUNK
    if depth is None or depth == t.DEPTH:
        return cfg
    global_blocks = tuple(i for i in t.GLOBAL_BLOCKS if i < depth) or (depth - 1,)
    trunk = dataclasses.replace(t, DEPTH=depth, GLOBAL_BLOCKS=global_blocks)
    return validate(dataclasses.replace(cfg, MODEL=dataclasses.replace(cfg.MODEL, TRUNK=trunk)))


def _record(framework: str, cfg, batch: int, dtype: str, timing: dict) -> dict:
    t = cfg.MODEL.TRUNK
    return {
        "framework": framework,
        "depth": t.DEPTH,
        "global_blocks": ",".join(map(str, t.GLOBAL_BLOCKS)),
        "image_size": cfg.MODEL.TEACHER.IMAGE_SIZE,
        "batch": batch,
        "dtype": dtype,
        "median_ms": timing["median_ms"],
        "min_ms": timing["min_ms"],
        "frames_per_s": batch / (timing["median_ms"] / 1e3),
    }


def _bench_jax(cfg, batch: int, warmup: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from es3_jax.models.trunk import compute_dtype, trunk_from_config

    dtype = compute_dtype(cfg.MODEL.COMPUTE_DTYPE)
    graphdef, state = nnx.split(trunk_from_config(cfg, dtype=dtype))
    size = cfg.MODEL.TEACHER.IMAGE_SIZE
    images = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)
    run = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))
    timing = time_call(lambda: block(run(state, images)), warmup=max(warmup, 1), repeats=repeats)
    return _record(f"jax ({jax.default_backend()})", cfg, batch, jnp.dtype(dtype).name, timing)


def _bench_torch(cfg, batch: int, warmup: int, repeats: int) -> dict:
    from porting.upstream import build_trunk, trunk_call

    t = cfg.MODEL.TRUNK
    size = cfg.MODEL.TEACHER.IMAGE_SIZE
    trunk = build_trunk(
        0,
        depth=t.DEPTH,
        img_size=size,
        global_blocks=t.GLOBAL_BLOCKS,
        window_size=t.WINDOW_SIZE,
        embed_dim=t.WIDTH,
        num_heads=t.NUM_HEADS,
        mlp_dim=t.MLP_DIM,
        pretrain_img_size=t.PRETRAIN_IMAGE_SIZE,
    )
    call, device, dtype = trunk_call(trunk, batch, size)
    return _record(f"torch ({device})", cfg, batch, dtype, time_call(call, warmup=warmup, repeats=repeats))


def run(args: argparse.Namespace) -> list[dict]:
    cfg = _geometry(load_config(args), args.depth)
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = set(frameworks) - {"jax", "torch"}
    if unknown:
        raise Es3Error(f"--frameworks: unknown {sorted(unknown)} (choose from jax, torch)")
    records = []
    if "jax" in frameworks:
        records.append(_bench_jax(cfg, args.batch_size, args.warmup, args.repeats))
    if "torch" in frameworks:
        records.append(_bench_torch(cfg, args.batch_size, args.warmup, args.repeats))
    return records
