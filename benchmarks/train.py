"""`es3 bench train`: the training step's time and throughput for a config, on synthetic batches.

The step is the one `es3 train` runs (`es3_jax.train.step.make_train_step`: the teacher's rollout,
the student beside it when distilling, the losses, the optimiser update), jit-compiled over a mesh of
every device, with random weights. One batch of the right shapes (`TRAIN.BATCH_SIZE` clips per
device, `DATA.NUM_FRAMES` frames, `DATA.MAX_OBJECTS` objects; trunk features in the store's dtype,
or normalised frames with `--on_the_fly`) is placed on the devices once, so the figures exclude the
input pipeline (`es3 bench data` measures that). On a GPU the records add the model FLOP utilisation
(MFU): the memory path's FLOPs per clip (`es3_jax.models.flops`: memory encoder, perceiver, memory
attention, forward and backward) over the device's dense peak. The neck, SAM heads and trunk are not
counted, so the MFU is a lower bound.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.gpu_targets import TARGETS
from benchmarks.harness import block, time_call
from es3_jax import config as config_lib

HELP = "training step: median ms and clips/s (distill or finetune) on synthetic batches; MFU on GPU"

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Dense peak FLOP/s by device kind (substring of `device_kind`), for bf16 compute and for float32
# compute (TF32 tensor cores, XLA's default precision for float32 matmuls on these GPUs).
PEAK_FLOPS = {
    **{t.name.upper(): t.peak_flops for t in TARGETS.values()},
    "L40S": {"bfloat16": 362e12, "float32": 183e12},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", default="tiny", help="a config under configs/ (name without .yaml) or a YAML path"
    )
    p.add_argument("--modes", nargs="+", choices=["distill", "finetune"], default=["distill"])
    p.add_argument(
        "--on_the_fly",
        action="store_true",
        help="batches of frames and the trunk inside the step (DATA.USE_PRECOMPUTED False)",
    )
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps (the first one compiles)")
    p.add_argument("--repeats", type=int, default=10, help="measured steps (the median is reported)")
    p.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides, e.g. TRAIN.BATCH_SIZE 2 DATA.NUM_FRAMES 8",
    )


def config_for(name: str, mode: str, overrides: list[str], *, on_the_fly: bool = False):
    """The config `name` (under configs/, or a YAML path) in `mode`, with random teacher weights."""

    path = Path(name) if name.endswith((".yaml", ".yml")) else CONFIGS / f"{name}.yaml"
    overrides = [*overrides, "TRAIN.MODE", mode, "MODEL.TEACHER_WEIGHTS", ""]
    if on_the_fly:
        overrides += ["DATA.USE_PRECOMPUTED", "False"]
    return config_lib.load(path, overrides)


def flops_per_clip(cfg) -> float:
    """Model FLOPs of one training clip's memory path, forward and backward (2× forward for what is
    differentiated). Each of the O object slots encodes frame 0's memory, then on each of the T−1
    tracked frames reads a bank of min(NUM_MASKMEM, T) frame slots and min(T, MAX_OBJ_PTRS) pointers
    (masked slots are computed too) and encodes its new memory."""
    from es3_jax.models.flops import memory_path_cost, total

    t, d = cfg.MODEL.TEACHER, cfg.DATA
    frames, objects = d.NUM_FRAMES, d.MAX_OBJECTS
    bank = {"num_frames": min(t.NUM_MASKMEM, frames), "num_pointers": min(frames, t.MAX_OBJ_PTRS_IN_ENCODER)}
    teacher = memory_path_cost(cfg, teacher=True, **bank)
    encoder = teacher["memory_encoder"].flops
    per_frame = total(teacher).flops
    if cfg.TRAIN.MODE == "distill":
        student = memory_path_cost(cfg, **bank)
        own = total(student).flops - student["memory_encoder"].flops  # perceiver + memory attention
        compress = total(student, "perceiver").flops  # frame 0's memory into the student's bank
        return objects * (encoder + 3 * compress + (frames - 1) * (per_frame + 3 * own))
    return objects * 3 * (encoder + (frames - 1) * per_frame)


def peak_flops(device, dtype: str) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, peaks in PEAK_FLOPS.items():
        if name in kind:
            return peaks.get(dtype)
    return None


def _synthetic_batch(cfg, clips: int, seed: int = 0) -> dict:
    """Random trunk features (or frames) and ground truth of moving rectangles, every slot valid."""

    from es3_jax.data import embedding_store

    t, d = cfg.MODEL.TEACHER, cfg.DATA
    rng = np.random.default_rng(seed)
    size = d.MASK_SIZE or t.IMAGE_SIZE
    masks = np.zeros((clips, d.NUM_FRAMES, d.MAX_OBJECTS, size, size), bool)
    side = max(size // 4, 2)
    for b in range(clips):
        for o in range(d.MAX_OBJECTS):
            y, x = rng.integers(0, size - side - d.NUM_FRAMES, size=2)
            for f in range(d.NUM_FRAMES):
                masks[b, f, o, y + f : y + f + side, x : x + side] = True
    batch = {
        "masks": masks,
        "object_valid": np.ones((clips, d.MAX_OBJECTS), bool),
        "clip_valid": np.ones((clips,), bool),
    }
    if d.USE_PRECOMPUTED:
        shape = (clips, d.NUM_FRAMES, t.grid, t.grid, t.TRUNK_DIM)
        dtype = embedding_store.read_dtype(d.EMBEDDING_DTYPE)
        batch["embeddings"] = rng.standard_normal(shape, np.float32).astype(dtype)
    else:
        shape = (clips, d.NUM_FRAMES, t.IMAGE_SIZE, t.IMAGE_SIZE, 3)
        batch["images"] = rng.standard_normal(shape, np.float32)
    return batch


def _measure(cfg, args: argparse.Namespace) -> dict:
    import jax

    from es3_jax import weights
    from es3_jax.models.trunk import compute_dtype
    from es3_jax.train import sharding
    from es3_jax.train.step import TRUNK
    from es3_jax.train.trainer import Learner

    mesh = sharding.make_mesh(cfg.MESH)
    learner = Learner(cfg, mesh, 1, weights.teacher(cfg, trunk=not cfg.DATA.USE_PRECOMPUTED))
    clips = cfg.TRAIN.BATCH_SIZE * mesh.size
    batch = sharding.global_batch(_synthetic_batch(cfg, clips), mesh)
    state = {}

    def run_step():
        state["metrics"] = learner.step(batch)
        block(state["metrics"])

    start = time.perf_counter()
    run_step()
    compile_s = time.perf_counter() - start
    timing = time_call(run_step, warmup=max(args.warmup - 1, 0), repeats=args.repeats)
    devices = jax.devices()
    dtype = compute_dtype(cfg.MODEL.COMPUTE_DTYPE).name
    clips_per_s = clips / (timing["median_ms"] / 1e3)
    record = {
        "config": args.config,
        "mode": cfg.TRAIN.MODE,
        "features": "frames + trunk" if TRUNK in learner.frozen else "store",
        "device": devices[0].device_kind,
        "devices": len(devices),
        "compute": dtype,
        "clips_per_step": clips,
        "frames": cfg.DATA.NUM_FRAMES,
        "objects": cfg.DATA.MAX_OBJECTS,
        "first_step_s": compile_s,
        "median_ms": timing["median_ms"],
        "min_ms": timing["min_ms"],
        "clips_per_s": clips_per_s,
        "loss": float(state["metrics"]["total"]),  # a NaN here flags a broken configuration
    }
    if devices[0].platform == "gpu":
        flops = flops_per_clip(cfg)
        per_device = clips_per_s / len(devices)
        peak = peak_flops(devices[0], dtype)
        record.update(
            clips_per_s_per_gpu=per_device,
            memory_path_tflop_per_clip=flops / 1e12,
            mfu=per_device * flops / peak if peak else None,
        )
    return record


def run(args: argparse.Namespace) -> list[dict]:
    return [
        _measure(config_for(args.config, mode, args.overrides, on_the_fly=args.on_the_fly), args)
        for mode in args.modes
    ]
