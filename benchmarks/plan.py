"""`es3 bench plan`: what `es3 train`'s step needs per device, compiled ahead of time and never run.

For a config, mode and mesh, the exact step `es3 train` jits (`trainer.Learner`: the teacher's
rollout, the student beside it when distilling, the losses, the AdamW update) is lowered on
abstract parameters and batches of `TRAIN.BATCH_SIZE` clips per device and compiled. The compiler's
memory analysis gives the per-device argument, output, donated (aliased) and temporary bytes; the
peak is arguments + outputs − aliased + temporaries.

`--target h100|h200|a100` compiles with XLA:GPU for a deviceless topology of that GPU
(`benchmarks/gpu_targets.py`; needs the CUDA plugin, no GPU): the GPU compiler's own plan, the
FLOPs and bytes of its kernels with their roofline time at the target's peaks, and how each
attention was compiled (`benchmarks/gpu_program.py`). `--devices N --hosts H` is the pod's mesh.

Without `--target`, `--devices N` plans on N fake CPU devices (set before JAX starts) with XLA:CPU,
whose buffer assignment differs from the GPU's (`--margin` keeps headroom for that); XLA's FLOP
count stands beside the memory path's (`es3_jax.models.flops`), and the predicted GPU step time is
the latter at a given dense peak and MFU.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from benchmarks.gpu_targets import TARGETS
from benchmarks.train import PEAK_FLOPS, config_for, flops_per_clip
from es3_jax import config as config_lib
from es3_jax.config import ConfigError

HELP = "train-step plan: per-device memory, FLOPs and predicted GPU step time, compiled without running"

GIB = 2**30
# Memory of one GPU as its driver reports it (nvidia-smi's total), in GiB.
GPU_MEMORY_GIB = {t.name.upper(): t.memory_gib for t in TARGETS.values()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default="efficient_memory",
        help="a config under configs/ (name without .yaml) or a YAML path",
    )
    p.add_argument("--modes", nargs="+", choices=["distill", "finetune"], default=["distill"])
    p.add_argument(
        "--target",
        choices=sorted(TARGETS),
        default=None,
        help="compile with XLA:GPU for this GPU (deviceless; needs the CUDA plugin) instead of XLA:CPU",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=8,
        help="devices of the mesh: GPUs of --target, else fake CPU devices (0: the machine's own, e.g. its GPUs)",
    )
    p.add_argument("--hosts", type=int, default=1, help="with --target: hosts the devices are spread over")
    p.add_argument(
        "--save_hlo",
        default=None,
        metavar="DIR",
        help="with --target: write each compiled step's optimised HLO to DIR (its fusions and kernels)",
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
        default=None,
        help="headroom kept over the peak when judging what fits a GPU (default: 0.15 over the CPU "
        "compiler's peak, none over XLA:GPU's own)",
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


def compiled_plan(learner, cfg, mesh, target=None, save_hlo: str | None = None) -> dict:
    """Compile `learner`'s train step for `cfg`'s batch on `mesh`: its memory and FLOP figures per
    device; with a GPU `target`, XLA:GPU's, with the roofline and the attention report."""
    from benchmarks.gpu_program import attention_report, compile_program, memory_plan

    clips = cfg.TRAIN.BATCH_SIZE * mesh.size
    batch = abstract_batch(cfg, clips, mesh)
    if target is not None:
        program = compile_program(
            f"{cfg.TRAIN.MODE} step", lambda: learner.lower(batch), target, cfg.MODEL.COMPUTE_DTYPE
        )
        roofline = program.roofline()
        if save_hlo:
            name = f"{cfg.TRAIN.MODE}_{cfg.MODEL.COMPUTE_DTYPE}_{cfg.TRAIN.REMAT}_b{cfg.TRAIN.BATCH_SIZE}"
            Path(save_hlo).mkdir(parents=True, exist_ok=True)
            (Path(save_hlo) / f"{name}.{target.name}.hlo.txt").write_text(program.compiled.as_text())
        return {
            **program.memory,
            "xla_tflop": roofline["tflop"],
            "gib_moved": roofline["gib_moved"],
            "roofline_s": roofline["roofline_ms"] / 1e3,
            "compute_bound": roofline["compute_bound_share"],
            "attention_time": roofline["attention_share"],
            "top_kernels": "; ".join(
                f"{k['kind']} {k['shape']} ×{k['runs']} {k['share']:.0%}" for k in roofline["top"]
            ),
            "attention": "; ".join(
                f"{a['implementation']} {a['array']} ×{a['runs']}" for a in attention_report(program.kernels)
            ),
            "compile_s": program.compile_s,
        }
    start = time.perf_counter()
    compiled = learner.lower(batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {
        **memory_plan(compiled),
        "xla_tflop": cost.get("flops", float("nan")) / 1e12,
        "compile_s": compile_s,
    }


def record(args: argparse.Namespace, cfg, mesh, learner, batch_size: int) -> dict:
    """The plan of `learner`'s step at `batch_size` clips per device, with its GPU prediction."""

    cfg = config_lib.override(cfg, "TRAIN.BATCH_SIZE", str(batch_size))
    target = TARGETS[args.target] if args.target else None
    plan = compiled_plan(learner, cfg, mesh, target, args.save_hlo)
    dtype = cfg.MODEL.COMPUTE_DTYPE
    flops = batch_size * flops_per_clip(cfg)
    gpu = target.name.upper() if target else args.gpu
    step_s = flops / (PEAK_FLOPS[gpu][dtype] * args.mfu)
    margin = args.margin if args.margin is not None else (0.0 if target else 0.15)
    fits = {
        f"fits_{name}": plan["peak_gib"] * (1 + margin) <= gib * args.mem_fraction
        for name, gib in GPU_MEMORY_GIB.items()
        if target is None or name == gpu
    }
    return {
        "config": args.config,
        "compiler": f"XLA:GPU {target.name}" if target else "XLA:CPU",
        "mode": cfg.TRAIN.MODE,
        "mesh": "×".join(str(n) for n in mesh.devices.shape),
        "clips_per_device": batch_size,
        "compute": dtype,
        "remat": cfg.TRAIN.REMAT,
        **plan,
        "memory_path_tflop": flops / 1e12,
        **fits,
        f"{gpu}_step_s": step_s,
        f"{gpu}_clips_per_s": batch_size * mesh.size / step_s,
    }


def run(args: argparse.Namespace) -> list[dict]:
    devices = None
    if args.target:
        from benchmarks.gpu_targets import topology

        devices = topology(TARGETS[args.target], args.devices or 8, args.hosts)
    elif args.devices > 0:
        use_fake_devices(args.devices)
    from es3_jax import weights
    from es3_jax.train import sharding
    from es3_jax.train.trainer import Learner

    records = []
    for mode, dtype, remat in itertools.product(args.modes, args.dtypes, args.remat or [None]):
        overrides = [*args.overrides, "MODEL.COMPUTE_DTYPE", dtype]
        overrides += ["TRAIN.REMAT", remat] if remat else []
        cfg = config_for(args.config, mode, overrides, on_the_fly=args.on_the_fly)
        mesh = sharding.make_mesh(cfg.MESH, devices)
        teacher = weights.teacher(cfg, trunk=not cfg.DATA.USE_PRECOMPUTED)
        learner = Learner(cfg, mesh, 1, teacher, abstract=True)
        records += [record(args, cfg, mesh, learner, b) for b in args.batch_sizes]
    return records
