"""`es3 demo`: the main job end to end on generated data, in minutes on a CPU."""

from __future__ import annotations

import argparse
import json

from es3_jax.commands.common import add_config_args
from es3_jax.errors import Es3Error

HELP = "run the main job end to end on generated videos: fine-tune a teacher, distil the student, evaluate"
DESCRIPTION = """\
With no argument: generate small SA-V-format videos, embed them with a small random trunk, fine-tune
a small tracker from random weights on their ground truth (the demo's teacher), distil the student
memory (Perceiver Resampler + pooled 2-layer memory attention) from a random initialisation, and
evaluate both on held-out videos, and export the student merged into the teacher as a PyTorch
checkpoint (efficient_sam3_full.pt, when torch is installed). With --sam3_weights the real SAM3 tracker is the teacher (use a
full-size --config then). Writes <output_dir>/summary.json: teacher J&F vs ground truth, the teacher
masks' mean area, the student's feature MSE at the start and end of distillation, student J&F vs the
teacher and vs ground truth, steps, wall time and peak memory; and prints where every output is.

The demo judges itself: at the end it prints each figure beside its target and margin and a verdict.
A target not met (a demo that did not learn) exits with status 1, naming the figure.

--report FILE... writes the judged figures into the demo blocks of those documents (docs/demo.md,
README.md), from this run or, with --from, from earlier runs' summary.json files (one column per
seed) without running anything."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output_dir", default="output/demo", help="where everything goes")
    p.add_argument("--sam3_weights", default=None, help="use the real SAM3 tracker as the teacher")
    p.add_argument(
        "--videos",
        type=int,
        default=None,
        help="number of generated videos (default: the demo's, docs/demo.md)",
    )
    p.add_argument("--finetune_steps", type=int, default=None, help="teacher steps (default: the config's)")
    p.add_argument(
        "--distill_steps",
        type=int,
        default=None,
        help="student steps (default: the demo's distillation schedule with the demo config, docs/demo.md; "
        "else the config's)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="TRAIN.SEED: draws the videos, the trunk and every initialisation",
    )
    p.add_argument(
        "--report",
        nargs="+",
        default=None,
        metavar="FILE",
        help="write the judged figures into these documents' demo blocks (e.g. docs/demo.md README.md)",
    )
    p.add_argument(
        "--from",
        dest="summaries",
        nargs="+",
        default=None,
        metavar="SUMMARY",
        help="with --report: report these runs' summary.json files instead of running the demo",
    )
    add_config_args(p)


def run(args: argparse.Namespace) -> int:
    from es3_jax import demo, demo_report  # jax and the models load when the command runs

    if args.summaries and not args.report:
        raise Es3Error("--from names the runs to report: give --report FILE... with it")
    if args.summaries:
        runs = demo_report.load_summaries(args.summaries)
    else:
        summary = demo.run(
            args.output_dir,
            config=args.config,
            overrides=args.overrides,
            sam3_weights=args.sam3_weights,
            videos=demo.DEMO_VIDEOS if args.videos is None else args.videos,
            finetune_steps=args.finetune_steps,
            distill_steps=args.distill_steps,
            seed=args.seed,
        )
        print(json.dumps({k: v for k, v in summary.items() if k not in ("judged", "verdict")}, indent=2))
        print(f"wrote {args.output_dir}/summary.json\n")
        print(demo.judgement_table(summary))
        runs = [summary]
    if args.report:
        for block in demo_report.write(args.report, runs):
            print(f"wrote {block}")
    return 0 if all(r["passed"] for r in runs) else 1
