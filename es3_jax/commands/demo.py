"""`es3 demo`: the main job end to end on the embedded default."""

from __future__ import annotations

import argparse

HELP = "run the frozen SAM3 tracker end to end on the embedded default"
DESCRIPTION = """\
Write tracker weights (random SAM3-geometry weights by default, or ported from
--sam3_weights), read them back, and run the teacher on a two-frame clip of synthetic
trunk features: a mask prompt and memory encoding on frame 0, memory attention and
mask decoding on frame 1. Writes <output_dir>/summary.json with timings and outputs."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output_dir", default="output/demo", help="where the weights and summary.json go")
    p.add_argument("--sam3_weights", default=None, help="use the real SAM3 tracker from this checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and features")


def run(args: argparse.Namespace) -> int:
    from es3_jax import demo

    summary = demo.run(args.output_dir, sam3_weights=args.sam3_weights, seed=args.seed)
    for key, value in summary.items():
        print(f"  {key}: {value}")
    print(f"wrote {args.output_dir}/summary.json and the weights folder {summary['weights']}")
    return 0
