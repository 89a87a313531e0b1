"""`es3 bench memory-attention`: one frame's memory attention at the tracking steady state.

The current frame (grid × grid queries) attends to 7 memory frames and 16 object pointers (64
tokens), batch 1 by default: the teacher (SAM3's 4 layers over the raw frames) and each student config
(compressed frames, pooled keys, 2 layers), in JAX (jit-compiled and warmed) and in PyTorch
(upstream sam3 for the teacher, the `porting.torch_student` twins for the students). Weights and
inputs are random; the perceiver's compression is not timed (it runs once per memory frame).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.harness import block, time_call
from es3_jax import config

HELP = "memory attention at the steady state (7 frames + 16 pointers): teacher vs students, JAX vs PyTorch"

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIGS = ("teacher", "efficient_memory", "edgetam_like", "efficienttam_like", "efficient_memory_324")
POINTER_TOKENS = 4


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--configs",
        nargs="+",
        default=list(DEFAULT_CONFIGS),
        help="'teacher' and/or student configs (a name under configs/ or a YAML path)",
    )
    p.add_argument(
        "--batch",
        nargs="+",
        type=int,
        default=[1],
        help="batch sizes (objects tracked at once); the teacher at 72×72 needs about 2.7 GB of memory "
        "per object (its cross-attention logits over 36,352 keys), so batch 8 needs about 22 GB",
    )
    p.add_argument("--grid", type=int, default=None, help="feature grid side (default: the tracker's, 72)")
    p.add_argument("--frames", type=int, default=7, help="memory frames in the bank")
    p.add_argument("--pointers", type=int, default=16, help="object pointers in the bank")
    p.add_argument("--frameworks", nargs="+", choices=["jax", "torch"], default=["jax", "torch"])
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs (the first one compiles)")
    p.add_argument("--repeats", type=int, default=5, help="measured runs (the median is reported)")
    p.add_argument("--seed", type=int, default=0)


def _load(name: str):
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONFIGS / f"{name}.yaml"
    return config.load(path if name != "teacher" else CONFIGS / "efficient_memory.yaml")


def _jax_runner(name: str, cfg, grid: int, batch: int, frames: int, pointers: int, seed: int):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from es3_jax.memory.attention import MemoryAttention
    from es3_jax.memory.path import MemoryPath
    from es3_jax.models.student import student_from_config

    t = cfg.MODEL.TEACHER
    if name == "teacher":
        attention = MemoryAttention(
            t.MEMORY_ATTENTION_LAYERS,
            t.D_MODEL,
            t.MEM_DIM,
            t.MEMORY_ATTENTION_FFN_DIM,
            t.MEMORY_ATTENTION_HEADS,
            t.ROPE_THETA,
            rngs=nnx.Rngs(seed),
        )
        module = MemoryPath(attention)
        tokens = grid * grid
    else:
        module = student_from_config(cfg, seed=seed)
        zeros = jnp.zeros((1, grid, grid, t.MEM_DIM))
        tokens = jax.eval_shape(module.compress, zeros, zeros)[0].shape[1]
    graphdef, state = nnx.split(module)

    @jax.jit
    def step(state, src, src_pos, bank, bank_pos, ptr, ptr_pos):
        return nnx.merge(graphdef, state)(
            src,
            src_pos,
            query_grid=(grid, grid),
            frames=bank,
            frames_pos=bank_pos,
            frame_valid=jnp.ones(bank.shape[:2], bool),
            pointers=ptr,
            pointers_pos=ptr_pos,
            pointer_valid=jnp.ones(ptr.shape[:2], bool),
        )

    keys = jax.random.split(jax.random.key(seed), 6)
    nq, ptr_tokens = grid * grid, pointers * POINTER_TOKENS
    args = (
        jax.random.normal(keys[0], (batch, nq, t.D_MODEL)),
        jax.random.normal(keys[1], (batch, nq, t.D_MODEL)),
        jax.random.normal(keys[2], (batch, frames, tokens, t.MEM_DIM)),
        jax.random.normal(keys[3], (batch, frames, tokens, t.MEM_DIM)),
        jax.random.normal(keys[4], (batch, ptr_tokens, t.MEM_DIM)),
        jax.random.normal(keys[5], (batch, ptr_tokens, t.MEM_DIM)),
    )
    return lambda: block(step(state, *args))


def _torch_runner(name: str, cfg, grid: int, batch: int, frames: int, pointers: int, seed: int):
    import torch

    t = cfg.MODEL.TEACHER
    g = torch.Generator().manual_seed(seed)
    nq, ptr_tokens = grid * grid, pointers * POINTER_TOKENS
    src, src_pos = (torch.randn(batch, nq, t.D_MODEL, generator=g) for _ in range(2))
    ptr, ptr_pos = (torch.randn(batch, ptr_tokens, t.MEM_DIM, generator=g) for _ in range(2))
    if name == "teacher":
        from porting.upstream import build_tracker

        encoder = build_tracker(seed).transformer.encoder
        nk = frames * nq + ptr_tokens
        memory, memory_pos = (torch.randn(batch, nk, t.MEM_DIM, generator=g) for _ in range(2))

        def run():
            with torch.inference_mode():
                return encoder(
                    src=[src.transpose(0, 1)],
                    src_key_padding_mask=[None],
                    src_pos=[src_pos.transpose(0, 1)],
                    prompt=memory.transpose(0, 1),
                    prompt_pos=memory_pos.transpose(0, 1),
                    prompt_key_padding_mask=None,
                    num_obj_ptr_tokens=ptr_tokens,
                )

        return run

    from porting.torch_student import torch_student_from_config

    twin = torch_student_from_config(cfg)
    with torch.inference_mode():
        zeros = torch.zeros(1, t.MEM_DIM, grid, grid)
        tokens = twin.compress(zeros, zeros)[0].shape[1]
    bank, bank_pos = (torch.randn(batch, frames, tokens, t.MEM_DIM, generator=g) for _ in range(2))
    frame_valid = torch.ones(batch, frames, dtype=torch.bool)
    pointer_valid = torch.ones(batch, ptr_tokens, dtype=torch.bool)

    def run():
        with torch.inference_mode():
            return twin(src, src_pos, (grid, grid), bank, bank_pos, frame_valid, ptr, ptr_pos, pointer_valid)

    return run


def run(args: argparse.Namespace) -> list[dict]:
    from es3_jax.models.flops import memory_path_cost, total

    records = []
    for name in args.configs:
        cfg = _load(name)
        grid = args.grid or cfg.MODEL.TEACHER.grid
        cost = memory_path_cost(
            cfg, teacher=name == "teacher", grid=grid, num_frames=args.frames, num_pointers=args.pointers
        )
        attention = total(cost, "memory_attention")
        for framework in args.frameworks:
            make = _jax_runner if framework == "jax" else _torch_runner
            for batch in args.batch:
                fn = make(name, cfg, grid, batch, args.frames, args.pointers, args.seed)
                timing = time_call(fn, warmup=args.warmup, repeats=args.repeats)
                records.append(
                    {
                        "config": Path(name).stem,
                        "framework": framework,
                        "batch": batch,
                        "median_ms": timing["median_ms"],
                        "min_ms": timing["min_ms"],
                        "gflops": batch * attention.flops / 1e9,
                        "params": attention.params,
                        "grid": grid,
                    }
                )
    teacher = {(r["framework"], r["batch"]): r for r in records if r["config"] == "teacher"}
    for r in records:
        ref = teacher.get((r["framework"], r["batch"]))
        if ref is not None:
            r["time_vs_teacher"] = r["median_ms"] / ref["median_ms"]
            r["flops_vs_teacher"] = r["gflops"] / ref["gflops"]
    return records
