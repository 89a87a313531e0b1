"""`es3 train`: distil the student memory (or fine-tune the tracker) with the config's recipe."""

from __future__ import annotations

import argparse

from es3_jax.commands.common import add_config_args, load_config

HELP = "train: distil the student memory from the frozen teacher, or fine-tune the tracker"
DESCRIPTION = """\
Train on pre-computed trunk embeddings (`es3 embed`) of SA-V-format videos, or with
DATA.USE_PRECOMPUTED False on the frames themselves (the frozen trunk of MODEL.TEACHER_WEIGHTS runs
inside every step: no store needed, but each step pays the trunk). TRAIN.MODE distill
(default) trains the Perceiver Resampler and pooled memory attention against the frozen teacher
(MODEL.TEACHER_WEIGHTS: a sam3.pt or an es3 weights folder) with 20·focal + 1·dice + 1·IoU + 1·MSE;
TRAIN.MODE finetune trains the tracker's memory attention, memory encoder and mask decoder on the
ground truth.

Writes <output_dir>/config.yaml, train.log, metrics.jsonl, tensorboard/, checkpoints/<step>/ (the
latest TRAIN.KEEP_LATEST, every TRAIN.SAVE_EVERY-th, and the best by validation J&F) and, at the end,
weights/ (an es3 weights folder for `es3 track` and `es3 eval`). SIGTERM or Ctrl-C
saves a checkpoint and stops; `--resume auto` continues exactly where the run stopped.

Multi-process runs (SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID) start every process with the same command; each reads its own share of the clips
and process 0 writes the logs and weights. A 2-process run on one machine is tested to equal the
single-process run."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output_dir", required=True, help="run folder (created)")
    p.add_argument(
        "--resume",
        default=None,
        help="'auto' (this --output_dir's latest checkpoint), a run folder, or <run>/ckpt_latest, "
        "<run>/ckpt_best, <run>/ckpt_step_<N>",
    )
    p.add_argument("--sam3_weights", default=None, help="teacher weights (sets MODEL.TEACHER_WEIGHTS)")
    add_config_args(p)


def run(args: argparse.Namespace) -> int:
    from es3_jax import config as config_lib
    from es3_jax.train.trainer import Trainer

    cfg = load_config(args)
    if args.sam3_weights:
        cfg = config_lib.override(cfg, "MODEL.TEACHER_WEIGHTS", args.sam3_weights)
    trainer = Trainer(cfg, args.output_dir, resume=args.resume)
    result = trainer.run()
    if result["stopped_by_signal"] is None:
        weights = trainer.export_weights()  # every process takes part; process 0 writes
        if trainer.process_index == 0:
            print(f"wrote {weights}")
    if trainer.process_index == 0:
        print(f"step {result['step']}: train {result['train']}")
        if result["val"]:
            print(f"validation: {result['val']}")
    return 0
