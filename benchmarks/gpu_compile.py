"""`es3 bench gpu-compile`: every program es3 runs on a GPU, compiled by XLA:GPU for a GPU that is
not here, with its compile time, its memory plan and how its attentions were compiled.

The programs are the ones the commands jit, built by the same code: `es3 train`'s distill and
finetune steps and its evaluation step (`trainer.Learner`, on a mesh of `--devices` GPUs), `es3
embed`'s batch of frames through SAM3's ViT and a stage-1 trunk (`embed.features_program`), and the
predictor's tracking operations with the teacher's and the student's memory (`VideoPredictor`'s
`operations`, their shapes taken from a short video tracked on the CPU first). A program XLA:GPU
cannot compile is recorded with its error. XLA options go in `XLA_FLAGS` (e.g.
`--xla_gpu_enable_triton_gemm=false`, cuBLAS for every GEMM: docs/benchmarks.md, 2026-12-07).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence

from benchmarks.gpu_targets import TARGETS

HELP = (
    "every GPU program of es3 compiled by XLA:GPU for a target GPU, deviceless: compile s, memory, attention"
)

STAGE1_TRUNK = "repvit_m0_9"
GROUPS = ("train", "embed", "track")
# The predictor's operations whose program depends on whose memory it reads.
MEMORY_OPERATIONS = ("prompt_memory", "step")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", choices=sorted(TARGETS), default="h100", help="the GPU to compile for")
    p.add_argument(
        "--config", default="tiny", help="a config under configs/ (name without .yaml) or a YAML path"
    )
    p.add_argument("--devices", type=int, default=2, help="GPUs of the training steps' mesh")
    p.add_argument(
        "--groups", nargs="+", choices=GROUPS, default=list(GROUPS), help="kinds of programs to compile"
    )
    p.add_argument(
        "--programs", nargs="+", default=None, help="names of the programs to compile (default: all)"
    )
    p.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides, e.g. DATA.NUM_FRAMES 3",
    )


def _abstract(tree, sharding):
    """ShapeDtypeStructs of `tree`'s arrays placed by `sharding`; other leaves (static values) kept."""
    import jax

    def one(x):
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return x

    return jax.tree.map(one, tree)


def train_programs(cfg, gpus: list) -> dict[str, Callable]:
    """The train steps (distill, finetune) and the evaluation step, each `() -> Lowered`."""
    from benchmarks.plan import abstract_batch
    from es3_jax import config as config_lib
    from es3_jax import weights
    from es3_jax.train import sharding
    from es3_jax.train.trainer import Learner

    programs = {}
    for mode in ("distill", "finetune"):
        mode_cfg = config_lib.override(cfg, "TRAIN.MODE", mode)
        mesh = sharding.make_mesh(mode_cfg.MESH, gpus)
        learner = Learner(mode_cfg, mesh, 1, weights.teacher(mode_cfg, trunk=False), abstract=True)
        batch = abstract_batch(mode_cfg, mode_cfg.TRAIN.BATCH_SIZE * mesh.size, mesh)
        programs[f"train_step_{mode}"] = functools.partial(learner.lower, batch)
        if mode == "distill":
            programs["eval_step"] = functools.partial(learner.lower_eval, batch)
    return programs


def embed_programs(cfg, gpu) -> dict[str, Callable]:
    """`es3 embed`'s batch of 2 frames through SAM3's ViT and through a stage-1 trunk, in the
    config's compute dtype as a GPU resolves it."""
    import jax
    import jax.numpy as jnp

    from es3_jax import config as config_lib
    from es3_jax.embed import features_program
    from es3_jax.models.trunk import compute_dtype, trunk_from_config

    one = jax.sharding.SingleDeviceSharding(gpu)
    # `es3 embed`'s dtype on a GPU: `auto` is bfloat16 there, whatever this host's backend.
    name = cfg.MODEL.COMPUTE_DTYPE
    dtype = jnp.dtype(jnp.bfloat16) if name == "auto" else compute_dtype(name)
    programs = {}
    for kind in ("sam3_vit", STAGE1_TRUNK):
        kind_cfg = config_lib.override(cfg, "MODEL.TRUNK.KIND", kind)
        size = kind_cfg.MODEL.TEACHER.IMAGE_SIZE
        d = kind_cfg.DATA
        fn, state = features_program(
            trunk_from_config(kind_cfg, seed=0, dtype=dtype), d.PIXEL_MEAN, d.PIXEL_STD, d.EMBEDDING_DTYPE
        )
        images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.uint8, sharding=one)
        programs[f"embed_{kind}"] = functools.partial(fn.lower, _abstract(state, one), images)
    return programs


def tracking_programs(cfg, gpu) -> dict[str, Callable]:
    """The predictor's operations (frame features, mask and click prompts, the prompt's memory, the
    tracking step), with the teacher's memory and with the student's (the two operations that read
    memory; the others are the tracker's alone, the same program either way), at the shapes a short video
    gives them: 3 frames of trunk features (the trunk is `embed`'s program), a mask on frame 0 and
    clicks on frame 1, tracked forward on the CPU, each object in a bank of its own (so that the
    per-pixel top object over several banks, `prompt_top`, runs too)."""
    import jax
    import numpy as np

    from es3_jax.predictor.video_predictor import VideoPredictor

    one = jax.sharding.SingleDeviceSharding(gpu)
    t = cfg.MODEL.TEACHER
    size = t.IMAGE_SIZE
    features = np.random.default_rng(0).standard_normal((3, t.grid, t.grid, t.TRUNK_DIM), np.float32)
    mask = np.zeros((size, size), bool)
    mask[size // 4 : size // 2, size // 4 : size // 2] = True
    programs = {}
    for memory in ("teacher", "student"):
        predictor = VideoPredictor.from_checkpoint(None, config=cfg, memory=memory, objects_per_batch=1)
        seen: dict[str, tuple] = {}
        engine = predictor.engine
        engine.operations = {n: _recording(n, f, seen, one) for n, f in engine.operations.items()}
        state = predictor.init_state(features, video_size=(size, size))
        predictor.add_new_mask(state, 0, 1, mask)
        predictor.add_new_points_or_box(state, 1, 2, points=[[size / 2, size / 2]], labels=[1])
        for _ in predictor.propagate_in_video(state):
            pass
        for name, (fn, shapes) in seen.items():
            if memory == "teacher" or name in MEMORY_OPERATIONS:
                programs[f"track_{memory}_{name}"] = functools.partial(fn.lower, *shapes)
    return programs


def _recording(name: str, fn: Callable, seen: dict, sharding) -> Callable:
    """`fn`, noting in `seen[name]` the abstract arguments of its first call (placed by `sharding`)."""

    def call(*args):
        seen.setdefault(name, (fn, _abstract(args, sharding)))
        return fn(*args)

    return call


def programs(cfg, target_name: str, devices: int = 2, groups: Sequence[str] = GROUPS) -> dict[str, Callable]:
    """The GPU programs of es3 for `cfg` in `groups` (train, embed, track), each
    `() -> jax.stages.Lowered` for GPUs of the target."""
    from benchmarks.gpu_targets import topology

    gpus = topology(TARGETS[target_name], devices)
    builders = {
        "train": lambda: train_programs(cfg, gpus),
        "embed": lambda: embed_programs(cfg, gpus[0]),
        "track": lambda: tracking_programs(cfg, gpus[0]),
    }
    return {name: lower for group in groups for name, lower in builders[group]().items()}


def run(args: argparse.Namespace) -> list[dict]:
    """One record per program; a program that does not compile gets its error instead of figures,
    and the others are still compiled."""
    from benchmarks.gpu_program import GpuCompileError, attention_report, compile_program
    from benchmarks.train import config_for

    cfg = config_for(args.config, "distill", args.overrides)
    target = TARGETS[args.target]
    records = []
    for name, lower in programs(cfg, args.target, args.devices, args.groups).items():
        if args.programs and name not in args.programs:
            continue
        record = {"program": name, "target": target.name}
        try:
            program = compile_program(name, lower, target, cfg.MODEL.COMPUTE_DTYPE)
        except GpuCompileError as e:
            print(f"{name}: {e}", file=sys.stderr, flush=True)
            records.append({**record, "error": str(e).splitlines()[0][:400]})
            continue
        print(f"{name}: compiled for {target.name} in {program.compile_s:.1f} s", file=sys.stderr, flush=True)
        attention = attention_report(program.kernels)
        records.append(
            {
                **record,
                "compile_s": program.compile_s,
                **program.memory,
                "attention": "; ".join(f"{a['implementation']} {a['array']} ×{a['runs']}" for a in attention),
            }
        )
    return records
