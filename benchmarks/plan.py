"""`es3 bench plan`: what `es3 train`'s step needs per device, compiled ahead of time and never run.

For a config, mode and mesh, the exact step `es3 train` jits (`trainer.Learner`: the teacher's
rollout, the student beside it when distilling, the losses, the AdamW update) is lowered on
abstract batches of `TRAIN.BATCH_SIZE` clips per device and compiled. XLA's memory analysis gives
the per-device argument, output, donated (aliased) and temporary bytes; the peak is
arguments + outputs − aliased + temporaries. XLA's FLOP count stands beside the memory path's
(`es3_jax.models.flops`, forward and backward); the predicted GPU step time is the latter at a
given dense peak and MFU.

`--devices N` plans on N fake CPU devices (set before JAX starts), so an 8-GPU host, or a pod of
several hosts (the same per-device program: `--devices 16` for 2 hosts × 8), is planned on a laptop.
The figures are the CPU compiler's; docs/benchmarks.md says how a GPU's differ and what margin
to keep (`--margin`).
"""

from __future__ import annotations

import argparse
import itertools
import time

from benchmarks.train import PEAK_FLOPS, config_for, flops_per_clip
from es3_jax import config as config_lib
from es3_jax.config import ConfigError

HELP = "train-step plan: per-device memory, FLOPs and predicted GPU step time, compiled without running"

GIB = 2**30
# Memory of one GPU as its driver reports it (nvidia-smi's total), in GiB.
GPU_MEMORY_GIB = {"H100": 79.6, "H200": 140.4}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default="efficient_memory",
        help="a config under configs/ (name without .yaml) or a YAML path",
    )
    p.add_argument("--modes", nargs="+", choices=["distill", "finetune"], default=["distill"])
    p.add_argument(
        "--devices",
        type=int,
        default=8,
        help="plan on this many fake CPU devices (0: the machine's own devices, e.g. its GPUs)",
    )
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[4], help="clips per device")
    p.add_argument(
        "--remat",
        nargs="+",
        default=None,
        choices=["none", "frame", "layer", "frame_layer"],
        help="TRAIN.REMAT settings to plan (default: the config's)",
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["bfloat16"],
        choices=["float32", "bfloat16"],
        help="compute dtypes (default: bfloat16, what MODEL.COMPUTE_DTYPE auto gives on a GPU)",
    )
    p.add_argument("--on_the_fly", action="store_true", help="frames and the trunk inside the step")
    p.add_argument("--gpu", choices=sorted(GPU_MEMORY_GIB), default="H100", help="device to predict time for")
    p.add_argument("--mfu", type=float, default=0.3, help="model FLOP utilisation assumed for the prediction")
    p.add_argument(
        "--mem_fraction",
        type=float,
        default=0.75,
        help="share of a GPU's memory JAX may use (XLA_PYTHON_CLIENT_MEM_FRACTION; JAX preallocates 0.75)",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=0.15,
        help="headroom kept over the CPU compiler's peak when judging what fits a GPU",
    )
    p.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides, e.g. DATA.NUM_FRAMES 8 MESH.FSDP 2",
    )


def use_fake_devices(count: int) -> None:
    """Make JAX start on `count` CPU devices; refuses once JAX has started with another count."""
    import jax

    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        pass  # already started: accepted below if it has the devices asked for
    if jax.device_count() != count:
        raise ConfigError(
            f"--devices {count}: JAX already runs on {jax.device_count()} devices; plan in a new process"
        )


def abstract_batch(cfg, clips: int, mesh) -> dict:
    """ShapeDtypeStructs of a global batch of `clips` clips, split over the mesh as `es3 train` splits it."""
    import jax
    import jax.numpy as jnp

    from es3_jax.data import embedding_store
    from es3_jax.train import sharding

    t, d = cfg.MODEL.TEACHER, cfg.DATA
    size = d.MASK_SIZE or t.IMAGE_SIZE
    spec = sharding.batch_sharding(mesh)

    def shaped(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=spec)

    batch = {
        "masks": shaped((clips, d.NUM_FRAMES, d.MAX_OBJECTS, size, size), jnp.bool_),
        "object_valid": shaped((clips, d.MAX_OBJECTS), jnp.bool_),
        "clip_valid": shaped((clips,), jnp.bool_),
    }
    if d.USE_PRECOMPUTED:
        dtype = embedding_store.read_dtype(d.EMBEDDING_DTYPE)
        batch["embeddings"] = shaped((clips, d.NUM_FRAMES, t.grid, t.grid, t.TRUNK_DIM), dtype)
    else:
        batch["images"] = shaped((clips, d.NUM_FRAMES, t.IMAGE_SIZE, t.IMAGE_SIZE, 3), jnp.float32)
    return batch


def compiled_plan(learner, cfg, mesh) -> dict:
    """Compile `learner`'s train step for `cfg`'s batch on `mesh`; its memory and FLOP figures per device."""
    clips = cfg.TRAIN.BATCH_SIZE * mesh.size
    start = time.perf_counter()
    compiled = learner.lower(abstract_batch(cfg, clips, mesh)).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    return {
        "argument_gib": mem.argument_size_in_bytes / GIB,
        "output_gib": mem.output_size_in_bytes / GIB,
        "aliased_gib": mem.alias_size_in_bytes / GIB,
        "temp_gib": mem.temp_size_in_bytes / GIB,
        "peak_gib": peak / GIB,
        "xla_tflop": cost.get("flops", float("nan")) / 1e12,
        "compile_s": compile_s,
    }


def record(args: argparse.Namespace, cfg, mesh, learner, batch_size: int) -> dict:
    """The plan of `learner`'s step at `batch_size` clips per device, with its GPU prediction."""

    cfg = config_lib.override(cfg, "TRAIN.BATCH_SIZE", str(batch_size))
    plan = compiled_plan(learner, cfg, mesh)
    dtype = cfg.MODEL.COMPUTE_DTYPE
    flops = batch_size * flops_per_clip(cfg)
    step_s = flops / (PEAK_FLOPS[args.gpu][dtype] * args.mfu)
    return {
        "config": args.config,
        "mode": cfg.TRAIN.MODE,
        "mesh": "×".join(str(n) for n in mesh.devices.shape),
        "clips_per_device": batch_size,
        "compute": dtype,
        "remat": cfg.TRAIN.REMAT,
        **plan,
        "memory_path_tflop": flops / 1e12,
        **{
            f"fits_{gpu}": plan["peak_gib"] * (1 + args.margin) <= gib * args.mem_fraction
            for gpu, gib in GPU_MEMORY_GIB.items()
        },
        f"{args.gpu}_step_s": step_s,
        f"{args.gpu}_clips_per_s": batch_size * mesh.size / step_s,
    }


def run(args: argparse.Namespace) -> list[dict]:
    if args.devices > 0:
        use_fake_devices(args.devices)
    from es3_jax import weights
    from es3_jax.train import sharding
    from es3_jax.train.trainer import Learner

    records = []
    for mode, dtype, remat in itertools.product(args.modes, args.dtypes, args.remat or [None]):
        overrides = [*args.overrides, "MODEL.COMPUTE_DTYPE", dtype]
        overrides += ["TRAIN.REMAT", remat] if remat else []
        cfg = config_for(args.config, mode, overrides, on_the_fly=args.on_the_fly)
        mesh = sharding.make_mesh(cfg.MESH)
        learner = Learner(cfg, mesh, 1, weights.teacher(cfg, trunk=not cfg.DATA.USE_PRECOMPUTED))
        records += [record(args, cfg, mesh, learner, b) for b in args.batch_sizes]
    return records
