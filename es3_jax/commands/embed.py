"""`es3 embed`: pre-compute the trunk features of every video frame into the embedding store."""

from __future__ import annotations

import argparse
from pathlib import Path

from es3_jax.commands.common import add_config_args, load_config
from es3_jax.errors import Es3Error, require_torch

HELP = "pre-compute trunk embeddings of video frames into the embedding store"
DESCRIPTION = """\
Run the frozen SAM3 ViT trunk over every frame of every video under --data_dir (SA-V
`<video>/<frame>.jpg`, DAVIS `JPEGImages/480p/<seq>/`, or one folder of frames) and store the
[h, w, C] features per frame in a TensorStore zarr v3 array per video (bfloat16 by default,
DATA.EMBEDDING_DTYPE: float32, or int8 with per-frame channel scales at half bf16's bytes), with
metadata.json per video and global_metadata.json.

Several processes (SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID):
video i goes to process i mod N; process 0 writes the global metadata once all have finished.
A re-run skips complete videos and redoes interrupted ones. A store written with another
trunk, normalisation or dtype is refused.

--import_pt DIR converts a seed-format folder (<video>/metadata.json + one [1024, 72, 72]
float32 .pt per frame) into the store without recomputing (needs torch)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data_dir", default=None, help="video frames; None: DATA.SAV_ROOT")
    p.add_argument("--output_dir", default=None, help="the embedding store; None: DATA.EMBEDDING_DIR")
    p.add_argument("--batch_size", type=int, default=8, help="frames per trunk call and per local device")
    p.add_argument("--sam3_weights", default=None, help="sam3.pt holding the trunk (default: random weights)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the random trunk when --sam3_weights is absent"
    )
    p.add_argument(
        "--on_error",
        choices=("stop", "skip"),
        default="stop",
        help="an unreadable or missing frame: stop naming it, or skip its video (listed in the global metadata)",
    )
    p.add_argument("--import_pt", default=None, metavar="DIR", help="import a seed-format .pt folder instead")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_config_args(p)


def _read_pt_frame(path: Path):
    """One seed `.pt` frame, read through torch; an error naming the extra where torch is missing."""
    require_torch(f"{path}: reading a .pt seed frame")
    from porting.seed_embeddings import read_pt_frame  # porting imports torch

    return read_pt_frame(path)


def run(args: argparse.Namespace) -> int:
    from es3_jax import embed, weights  # jax and the models load when the command runs

    cfg = load_config(args)
    output_dir = args.output_dir or cfg.DATA.EMBEDDING_DIR
    if not output_dir:
        raise Es3Error("no store given: pass --output_dir or set DATA.EMBEDDING_DIR")
    trunk = weights.load(args.sam3_weights, cfg, seed=args.seed, parts=(weights.TRUNK,))
    cfg = trunk.cfg  # a stage-1 checkpoint sets MODEL.TRUNK.KIND
    if args.import_pt:
        summary = embed.run_import(
            cfg,
            args.import_pt,
            output_dir,
            read_pt=_read_pt_frame,
            weights=trunk if args.sam3_weights else None,
            on_error=args.on_error,
        )
    else:
        summary = embed.run(
            cfg,
            args.data_dir or cfg.DATA.SAV_ROOT,
            output_dir,
            weights=trunk,
            batch_size=args.batch_size,
            on_error=args.on_error,
            seed=args.seed,
            progress=not args.no_progress,
        )
    failed = summary.get("failed_all", [{"video": k, "error": e} for k, e in summary["failed"].items()])
    line = (
        f"process {summary['process']}/{summary['processes']}: wrote {len(summary['written'])} videos "
        f"({summary['frames']} frames, {summary['seconds']:.1f} s), skipped {len(summary['skipped'])} complete"
    )
    print(line)
    for item in failed:
        print(f"  failed: {item['video']}: {item['error']}")
    if "complete" in summary:
        print(f"{output_dir}: {summary['complete']} of {summary['total_videos']} videos complete")
    return 0
