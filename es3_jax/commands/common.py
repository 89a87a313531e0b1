"""Arguments and helpers shared by the `es3` subcommands."""

from __future__ import annotations

import argparse

from es3_jax import config as config_lib


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def add_config_args(p: argparse.ArgumentParser) -> None:
    """`--config FILE` and `KEY VALUE` overrides, as every config-driven command takes. The command's
    options may come before, between or after the pairs: `es3_jax.cli.main` adds the pairs argparse
    leaves over (those after an option) with `merge_overrides`."""
    p.add_argument("--config", default=None, help="YAML config file (defaults: the built-in values)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY VALUE",
        help="config overrides as KEY VALUE pairs, e.g. MODEL.TEACHER.NUM_MASKMEM 7 (options may "
        "follow them)",
    )


def merge_overrides(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """Append to `args.overrides` the arguments `parse_known_args` left over (pairs after an option,
    and values such as -1e-3 that look like options), in the order given -> the arguments that are
    no override: those of a command without overrides, and unknown options where a KEY belongs."""
    if not hasattr(args, "overrides"):
        return extra
    args.overrides = [*args.overrides, *extra]
    return [key for key in args.overrides[::2] if key.startswith("-")]


def load_config(args: argparse.Namespace):
    """The config tree from `--config` and the trailing overrides."""
    return config_lib.load(args.config, args.overrides)
