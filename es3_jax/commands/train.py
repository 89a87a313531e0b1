"""`es3 train`: distil the student memory (or fine-tune the tracker) with the config's recipe."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from es3_jax.commands.common import add_config_args, load_config
from es3_jax.errors import Es3Error

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
weights/ (an es3 weights folder for `es3 track` and `es3 eval`). Nothing is written before the
models and data are built: a start that fails leaves the output folder as it was.

--resume auto continues exactly where the run stopped, from the newest checkpoint of
--output_dir, or starts at step 0 when there is none: a first start and every restart are one
command (once weights/ holds the last step, the run is complete: it exits 0). A damaged newest
checkpoint (a file missing or cut, an array that does not match its checksum) is skipped for the
next older one with a warning, and moved to checkpoints_set_aside/; a damaged named checkpoint
(ckpt_step_<N>, ckpt_best), or one of another config, is an error.

Exit status: 0 the run finished (weights/ written); 2 an error the message explains (bad input,
damaged checkpoints, a full disk: the checkpoints written before stay good); 128 + the signal's
number after SIGTERM (143) or Ctrl-C (130): the step in progress was finished and saved, and
`--resume auto` continues it.

Multi-process runs (SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID) start every process with the same command; each reads its own share of the clips
and process 0 writes the logs and weights. A 2-process run on one machine is tested to equal the
single-process run."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output_dir", required=True, help="run folder (created)")
    p.add_argument(
        "--resume",
        default=None,
        help="'auto' (this --output_dir's latest checkpoint; none: start at step 0), a run folder, or "
        "<run>/ckpt_latest, <run>/ckpt_best, <run>/ckpt_step_<N>",
    )
    p.add_argument("--sam3_weights", default=None, help="teacher weights (sets MODEL.TEACHER_WEIGHTS)")
    add_config_args(p)


def run(args: argparse.Namespace) -> int:
    from es3_jax import checkpoints  # jax and orbax load when the command runs

    try:
        return _train(args)
    except Es3Error:
        raise
    except Exception as e:
        # The file system refusing a log line or the final weights (a checkpoint says so itself).
        reason = checkpoints.write_error(e)
        if reason is None:
            raise
        raise Es3Error(f"cannot write under {args.output_dir}: {reason}") from e


def _train(args: argparse.Namespace) -> int:
    from es3_jax import config as config_lib
    from es3_jax.train.trainer import Trainer

    cfg = load_config(args)
    if args.sam3_weights:
        cfg = config_lib.override(cfg, "MODEL.TEACHER_WEIGHTS", args.sam3_weights)
    if args.resume == "auto" and (done := _finished(Path(args.output_dir), cfg.TRAIN.MAX_STEPS)):
        print(f"{done} holds the weights of step {cfg.TRAIN.MAX_STEPS}: the run is complete")
        return 0
    trainer = Trainer(cfg, args.output_dir, resume=args.resume)
    result = trainer.run()
    stopped = result["stopped_by_signal"]
    if stopped is None:
        weights = trainer.export_weights()  # every process takes part; process 0 writes
        if trainer.process_index == 0:
            print(f"wrote {weights}")
    if trainer.process_index == 0:
        print(f"step {result['step']}: train {result['train']}")
        if result["val"]:
            print(f"validation: {result['val']}")
    if stopped is not None:
        if trainer.process_index == 0:
            print(
                f"stopped by {signal.Signals(stopped).name} at step {result['step']} of "
                f"{cfg.TRAIN.MAX_STEPS} (saved); `--resume auto` continues",
                file=sys.stderr,
            )
        return interrupted_status(stopped)
    return 0


def _finished(output_dir: Path, max_steps: int) -> Path | None:
    """The weights folder of a run that reached `max_steps`, None when there is none: a scheduler
    that runs `--resume auto` again after the end finds nothing to do."""
    from es3_jax import weights

    report = output_dir / "weights" / weights.REPORT_FILE
    if not report.is_file():
        return None
    return report.parent if json.loads(report.read_text()).get("step") == max_steps else None


def interrupted_status(signum: int) -> int:
    """The exit status of a run a signal stopped after saving: 128 + the signal's number, as a shell
    reports a process the signal killed, so that a scheduler or `es3 train && ...` sees an
    unfinished run."""
    return 128 + signum
