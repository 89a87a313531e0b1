"""Trunk throughput: frames/s of each trunk in JAX beside its PyTorch counterpart, same geometry,
batch and run, with the FLOPs per frame and the speed relative to SAM3's ViT.

Trunks (`--trunks`): `sam3_vit` (SAM3's ViT; PyTorch: the upstream sam3 `ViT`) and the stage-1
students (`repvit_m1_1`, `tiny_vit_11m`, `efficientvit_b1`, ... with their head; PyTorch: timm's
model of the same architecture and the head as `nn.Sequential`), all with random weights. The JAX
trunk is jit-compiled and warmed, in the config's compute dtype (`MODEL.COMPUTE_DTYPE`: auto is
bfloat16 on accelerators, float32 on CPU); PyTorch runs in eval mode under `torch.inference_mode`,
float32 on CPU and bfloat16 autocast on CUDA. FLOPs are counted from the traced JAX program
(`es3_jax.models.flops.trunk_cost`). `--depth` shortens the ViT (global blocks: SAM3's below that
depth, or the last block) for a quick CPU run; its records then say so.
"""

from __future__ import annotations

import argparse
import dataclasses

from benchmarks.harness import block, time_call
from es3_jax.commands.common import add_config_args, load_config
from es3_jax.config import STAGE1_TRUNK_KINDS, apply_overrides, validate
from es3_jax.errors import Es3Error

HELP = "trunks: frames/s and FLOPs of SAM3's ViT and the stage-1 students, JAX beside PyTorch"
DEFAULT_TRUNKS = "sam3_vit,repvit_m1_1,tiny_vit_11m,efficientvit_b1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trunks", default=DEFAULT_TRUNKS, help="comma-separated MODEL.TRUNK.KIND values to time")
    p.add_argument(
        "--batch_size", default="1", help="frames per trunk call; a comma-separated list times each"
    )
    p.add_argument(
        "--depth", type=int, default=None, help="ViT blocks to run; none: all of MODEL.TRUNK.DEPTH"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed calls per framework")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (compilation, caches)")
    p.add_argument("--frameworks", default="jax,torch", help="comma-separated subset of jax,torch to measure")
    add_config_args(p)


def _trunk_config(cfg, kind: str, depth: int | None):
    """The config of one trunk kind; the ViT shortened to `depth` blocks, its global blocks kept inside."""
    cfg = apply_overrides(cfg, ["MODEL.TRUNK.KIND", kind])
    t = cfg.MODEL.TRUNK
    if kind != "sam3_vit" or depth is None or depth == t.DEPTH:
        return cfg
    global_blocks = tuple(i for i in t.GLOBAL_BLOCKS if i < depth) or (depth - 1,)
    trunk = dataclasses.replace(t, DEPTH=depth, GLOBAL_BLOCKS=global_blocks)
    return validate(dataclasses.replace(cfg, MODEL=dataclasses.replace(cfg.MODEL, TRUNK=trunk)))


def _record(framework: str, cfg, batch: int, dtype: str, timing: dict) -> dict:
    t = cfg.MODEL.TRUNK
    return {
        "trunk": t.KIND if t.KIND != "sam3_vit" else f"sam3_vit (depth {t.DEPTH})",
        "framework": framework,
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


def _torch_trunk(cfg):
    """The PyTorch model of the config's trunk, random weights, eval mode."""
    t = cfg.MODEL.TRUNK
    size = cfg.MODEL.TEACHER.IMAGE_SIZE
    if t.KIND == "sam3_vit":
        from porting.upstream import build_trunk

        return build_trunk(
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
    from porting.stage1_checkpoint import timm_stage1_trunk

    return timm_stage1_trunk(t.KIND, size // cfg.MODEL.TEACHER.BACKBONE_STRIDE, cfg.MODEL.TEACHER.TRUNK_DIM)


def _bench_torch(cfg, batch: int, warmup: int, repeats: int) -> dict:
    from porting.upstream import trunk_call

    call, device, dtype = trunk_call(_torch_trunk(cfg), batch, cfg.MODEL.TEACHER.IMAGE_SIZE)
    return _record(f"torch ({device})", cfg, batch, dtype, time_call(call, warmup=warmup, repeats=repeats))


def _split(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise Es3Error(f"{what}: nothing given")
    return items


def run(args: argparse.Namespace) -> list[dict]:
    from es3_jax.models.flops import trunk_cost

    base = load_config(args)
    frameworks = _split(args.frameworks, "--frameworks")
    unknown = set(frameworks) - {"jax", "torch"}
    if unknown:
        raise Es3Error(f"--frameworks: unknown {sorted(unknown)} (choose from jax, torch)")
    trunks = _split(args.trunks, "--trunks")
    bad = [k for k in trunks if k not in ("sam3_vit", *STAGE1_TRUNK_KINDS)]
    if bad:
        raise Es3Error(f"--trunks: unknown {bad} (choose from sam3_vit, {', '.join(STAGE1_TRUNK_KINDS)})")
    try:
        batches = [int(b) for b in _split(args.batch_size, "--batch_size")]
    except ValueError as e:
        raise Es3Error(f"--batch_size: {args.batch_size!r} is not a comma-separated list of integers") from e
    records = []
    for kind in trunks:
        cfg = _trunk_config(base, kind, args.depth)
        cost = trunk_cost(cfg)
        for batch in batches:
            measured = []
            if "jax" in frameworks:
                measured.append(_bench_jax(cfg, batch, args.warmup, args.repeats))
            if "torch" in frameworks:
                measured.append(_bench_torch(cfg, batch, args.warmup, args.repeats))
            for r in measured:
                r.update(params_m=cost.params / 1e6, gflops_per_frame=cost.flops / 1e9)
            records += measured
    # Speed relative to the ViT measured in this run, same framework and batch.
    vit = {(r["framework"], r["batch"]): r for r in records if r["trunk"].startswith("sam3_vit")}
    for r in records:
        ref = vit.get((r["framework"], r["batch"]))
        if ref is not None:
            r["speed_vs_vit"] = r["frames_per_s"] / ref["frames_per_s"]
            r["flops_vs_vit"] = r["gflops_per_frame"] / ref["gflops_per_frame"]
    return records
