"""`es3 demo`: the main job end to end on generated data, in minutes on a CPU."""

from __future__ import annotations

import argparse
import json

from es3_jax.commands.common import add_config_args

HELP = "run the main job end to end on generated videos: fine-tune a teacher, distil the student, evaluate"
DESCRIPTION = """\
With no argument: generate small SA-V-format videos, embed them with a small random trunk, fine-tune
a small tracker from random weights on their ground truth (the demo's teacher), distil the student
memory (Perceiver Resampler + pooled 2-layer memory attention) from a random initialisation, and
evaluate both on held-out videos, and export the student merged into the teacher as a PyTorch
checkpoint (efficient_sam3_full.pt, when torch is installed). With --sam3_weights the real SAM3 tracker is the teacher (use a
full-size --config then). Writes <output_dir>/summary.json: teacher J&F vs ground truth, the teacher
masks' mean area, the student's feature MSE at the start and end of distillation, student J&F vs the
teacher and vs ground truth, steps and wall time; and prints where every output is."""


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
    add_config_args(p)


def run(args: argparse.Namespace) -> int:
    from es3_jax import demo  # jax and the models load when the command runs

    summary = demo.run(
        args.output_dir,
        config=args.config,
        overrides=args.overrides,
        sam3_weights=args.sam3_weights,
        videos=demo.DEMO_VIDEOS if args.videos is None else args.videos,
        finetune_steps=args.finetune_steps,
        distill_steps=args.distill_steps,
    )
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.output_dir}/summary.json")
    return 0
