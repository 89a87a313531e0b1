"""`es3 eval`: semi-supervised VOS on DAVIS 2017 or SA-V, scored as the official tools score it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from es3_jax.commands.common import add_config_args, load_config
from es3_jax.data import datasets

HELP = "semi-supervised VOS evaluation (J&F) on DAVIS 2017 or SA-V, or scoring of existing predictions"
DESCRIPTION = """\
Track every object of every video from its ground-truth mask (DAVIS: the masks of frame 0;
SA-V: each object from its first annotated appearance), write the predicted masks in the
dataset's layout under <output_dir>/predictions, and score them the way the official tools do:

  davis  davis2017-evaluation, semi-supervised: objects 1..N of GT frame 0, first and last
         frame dropped; writes global_results.csv and per-sequence_results.csv (0-1).
  sav    sam2 sav_benchmark: per-object PNG folders, each object's first and last annotated
         frame dropped; writes results.csv (0-100). An object empty on every annotated frame
         has no prompt: it is neither tracked nor scored, with a warning (the official tool
         stops on it), and summary.json lists it under objects_not_scored.

Every annotated frame needs its JPEG; a missing one is an error before anything is tracked.

Both write per-object_results.csv (full precision) and summary.json (J&F, J and F
mean/recall/decay; with tracking also frames/s and ms per frame of each component).

With --score_only, nothing is tracked: predictions from any tracker under --pred_root are
scored against --gt_root with --layout's conventions.

Examples:
  es3 eval --dataset davis --data_root data/DAVIS --checkpoint sam3.pt --output_dir out/davis
  es3 eval --score_only --layout sav --pred_root preds --gt_root sav_val/Annotations_6fps --output_dir out"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        choices=sorted(datasets.SOURCES),
        default=None,
        help="dataset format (default: EVAL.DATASET)",
    )
    p.add_argument("--data_root", default=None, help="DAVIS or SA-V val/test root (default: EVAL.DATA_ROOT)")
    p.add_argument("--split", default="val", help="split list: ImageSets/2017/<split>.txt or sav_<split>.txt")
    p.add_argument("--sequences", default=None, help="comma-separated sequence names (default: the split)")
    p.add_argument("--resolution", default="480p", help="DAVIS resolution folder")
    p.add_argument(
        "--checkpoint", default=None, help="sam3.pt, es3 weights folder or checkpoint (none: random)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of random weights when no checkpoint is given")
    p.add_argument("--output_dir", required=True, help="where predictions, CSVs and summary.json go")
    p.add_argument(
        "--score_only", action="store_true", help="score --pred_root against --gt_root, no tracking"
    )
    p.add_argument("--pred_root", default=None, help="--score_only: predicted masks, one folder per sequence")
    p.add_argument("--gt_root", default=None, help="--score_only: GT masks, one folder per sequence")
    p.add_argument(
        "--layout", choices=("davis", "sav"), default=None, help="--score_only: scoring conventions"
    )
    p.add_argument(
        "--no_skip_first_last",
        action="store_true",
        help="sav layout: also score each object's first and last frame (not the standard protocol)",
    )
    add_config_args(p)


def _sequences(args: argparse.Namespace) -> list[str] | None:
    return [s for s in args.sequences.split(",") if s] if args.sequences else None


def run(args: argparse.Namespace) -> int:
    from es3_jax.eval import job as eval_job
    from es3_jax.eval import vos

    if args.score_only:
        summary = eval_job.score_predictions(
            args.pred_root,
            args.gt_root,
            args.layout,
            Path(args.output_dir),
            sequences=_sequences(args),
            resolution=args.resolution,
            skip_first_and_last=not args.no_skip_first_last,
        )
        print(vos.format_summary(summary))
        print(f"wrote {args.output_dir}/summary.json")
        return 0
    from es3_jax.predictor import VideoPredictor

    cfg = load_config(args)
    job = eval_job.EvalJob(
        args.dataset or cfg.EVAL.DATASET,
        args.data_root or cfg.EVAL.DATA_ROOT,
        Path(args.output_dir),
        split=args.split,
        sequences=_sequences(args),
        resolution=args.resolution,
        skip_first_and_last=not args.no_skip_first_last,
    )
    videos, not_scored = eval_job.open_videos(job)
    for name, objects in not_scored.items():
        print(
            f"es3 eval: {name}: objects {', '.join(objects)} are empty on every annotated frame; "
            "not tracked or scored",
            file=sys.stderr,
        )
    if args.checkpoint is None:
        print("no --checkpoint: random weights, the scores are meaningless")
    predictor = VideoPredictor.from_checkpoint(args.checkpoint, config=cfg, seed=args.seed)
    summary = eval_job.evaluate(job, predictor, videos, not_scored, {"checkpoint": args.checkpoint})
    print(vos.format_summary(summary))
    print(f"wrote {job.output_dir}/summary.json and the predictions under {job.output_dir}/predictions")
    return 0
