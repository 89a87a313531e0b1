"""Arguments and helpers shared by the `es3` subcommands."""

from __future__ import annotations

import argparse

from es3_jax import config as config_lib


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def add_config_args(p: argparse.ArgumentParser) -> None:
    """`--config FILE` and trailing `KEY VALUE` overrides, as every config-driven command takes."""
    p.add_argument("--config", default=None, help="YAML config file (defaults: the built-in values)")
    p.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides as KEY VALUE pairs, e.g. MODEL.TEACHER.NUM_MASKMEM 7",
    )


def load_config(args: argparse.Namespace):
    """The config tree from `--config` and the trailing overrides."""
    return config_lib.load(args.config, args.overrides)
