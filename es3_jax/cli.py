"""The `es3` command.

Every subcommand takes `--config FILE` and trailing `KEY VALUE` overrides of the config tree
(`es3 port ... MODEL.TEACHER.NUM_MASKMEM 7`). Heavy imports happen inside the subcommands so
that `es3 --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from es3_jax import __version__

DESCRIPTION = """\
es3 — EfficientSAM3 stage 2 in JAX: distil the SAM3 video tracker's memory into a Perceiver
Resampler and a pooled 2-layer memory attention.

commands:
  port    read SAM3 tracker weights from a PyTorch checkpoint (sam3.pt, a stage-1 merged
          checkpoint, or the transformers Sam3TrackerVideo layout) into an es3 weights folder
  demo    run the frozen SAM3 tracker end to end on the embedded default (random weights,
          synthetic features), or on real weights with --sam3_weights

Run `es3 <command> --help` for a command's options.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config file (defaults: the built-in SAM3 values)")
    p.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides as KEY VALUE pairs, e.g. MODEL.TEACHER.NUM_MASKMEM 7",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="es3", description=DESCRIPTION, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"es3-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    port = sub.add_parser(
        "port",
        formatter_class=_Formatter,
        help="port SAM3 tracker weights from PyTorch into an es3 weights folder",
        description=(
            "Read the SAM3 tracker and its neck from a PyTorch checkpoint and write them as an es3\n"
            "weights folder (orbax params + config.yaml + port.json) that loads without torch.\n\n"
            "Accepted: Meta's sam3.pt (ckpt['model'] with tracker.* and detector.* keys); a stage-1\n"
            "merged checkpoint (same layout, another trunk: reported as foreign, not ported); a\n"
            "transformers Sam3TrackerVideoModel .safetensors file or folder. Porting is strict:\n"
            "missing, unexpected and mis-shaped tracker keys are listed together and nothing is\n"
            "written. Detector keys es3 does not use are reported, not an error."
        ),
    )
    port.add_argument(
        "--sam3_weights", required=True, help="sam3.pt, a stage-1 merged .pt, or a .safetensors"
    )
    port.add_argument(
        "--output_dir", required=True, help="weights folder to create (must not exist or be empty)"
    )
    _add_config_args(port)

    demo = sub.add_parser(
        "demo",
        formatter_class=_Formatter,
        help="run the frozen SAM3 tracker end to end on the embedded default",
        description=(
            "Write tracker weights (random SAM3-geometry weights by default, or ported from\n"
            "--sam3_weights), read them back, and run the teacher on a two-frame clip of synthetic\n"
            "trunk features: a mask prompt and memory encoding on frame 0, memory attention and\n"
            "mask decoding on frame 1. Writes <output_dir>/summary.json with timings and outputs."
        ),
    )
    demo.add_argument("--output_dir", default="output/demo", help="where the weights and summary.json go")
    demo.add_argument("--sam3_weights", default=None, help="use the real SAM3 tracker from this checkpoint")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights and features")
    return parser


def _load_config(args: argparse.Namespace):
    from es3_jax import config as config_lib

    return config_lib.load(args.config, args.overrides)


def run_port(args: argparse.Namespace) -> int:
    from es3_jax import tracker_weights
    from es3_jax.models.tracker import expected_param_shapes
    from porting.sam3_checkpoint import format_report, port_checkpoint

    cfg = _load_config(args)
    result = port_checkpoint(args.sam3_weights, expected=expected_param_shapes(cfg.MODEL.TEACHER))
    out = tracker_weights.save(args.output_dir, result.params, cfg, result.summary())
    print(format_report(result))
    print(f"wrote {out}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from es3_jax import demo

    summary = demo.run(args.output_dir, sam3_weights=args.sam3_weights, seed=args.seed)
    for key, value in summary.items():
        print(f"  {key}: {value}")
    print(f"wrote {args.output_dir}/summary.json and the weights folder {summary['weights']}")
    return 0


COMMANDS = {"port": run_port, "demo": run_demo}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from es3_jax.config import ConfigError
    from es3_jax.tracker_weights import WeightsError
    from porting.sam3_checkpoint import CheckpointError

    try:
        return COMMANDS[args.command](args)
    except (CheckpointError, ConfigError, WeightsError) as e:
        print(f"es3 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
