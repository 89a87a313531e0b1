"""The `es3` command.

Each subcommand lives in `es3_jax/commands/<name>.py`. Config-driven commands take `--config FILE`
and `KEY VALUE` overrides of the config tree (`es3 port ... MODEL.TEACHER.NUM_MASKMEM 7`), before or
after their options.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence

from es3_jax import __version__
from es3_jax.commands.common import Formatter, merge_overrides
from es3_jax.errors import Es3Error, installed

# Subcommand name -> module under es3_jax.commands, in the order `es3 --help` lists them.
COMMANDS = {
    "demo": "demo",
    "make-synthetic": "make_synthetic",
    "embed": "embed",
    "train": "train",
    "eval": "eval",
    "track": "track",
    "port": "port",
    "export": "export",
    "bench": "bench",
}


def _command_module(name: str):
    return importlib.import_module(f"es3_jax.commands.{COMMANDS[name]}")


def _description() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [f"  {name:<{width}}  {_command_module(name).HELP}" for name in COMMANDS]
    return (
        "es3 — EfficientSAM3 stage 2 in JAX: distil the SAM3 video tracker's memory into a Perceiver\n"
        "Resampler and a pooled 2-layer memory attention.\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\nRun `es3 <command> --help` for a command's options."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="es3", description=_description(), formatter_class=Formatter)
    parser.add_argument("--version", action="version", version=f"es3-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMANDS:
        module = _command_module(name)
        p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION, formatter_class=Formatter)
        module.add_arguments(p)
    return parser


def _drop_closed_loop_reports() -> None:
    """After a failed orbax save (a full disk), tensorstore completes the writes orbax abandoned on
    the event loop orbax has closed: each one reports "Event loop is closed" as an unraisable
    exception, a traceback apiece, around the command's own error. Those reports are dropped; every
    other goes to the hook there was."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop", False):
        return

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop = True
    sys.unraisablehook = hook


def _cpu_without_nvidia_driver() -> None:
    """Where JAX's CUDA plugin is installed (the `cuda12` extra; the tests install it to compile for
    GPUs that are not there) on a machine without an NVIDIA driver, JAX would try CUDA first and
    print a traceback before falling back to the CPU. Unless JAX_PLATFORMS says otherwise, such a
    machine runs on its CPU."""
    if "JAX_PLATFORMS" in os.environ or not installed("jax_plugins.xla_cuda12"):
        return
    if not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl")):
        os.environ["JAX_PLATFORMS"] = "cpu"


HUGE_PAGES = "glibc.malloc.hugetlb=1"


def _restart_with_huge_pages() -> None:
    """XLA's CPU runtime maps each program run's buffers afresh, and with 4 KiB pages a run touches
    them one page fault at a time: a third of the demo's CPU time went to the kernel (100 M faults).
    glibc ≥ 2.35 backs its large allocations with transparent huge pages (2 MiB) when asked before
    the process starts, so on Linux with glibc the command starts again once, asking (a fine-tuning
    step of the demo: 288 → 215 ms). Where THP is off or glibc older, nothing changes."""
    if not sys.platform.startswith("linux") or HUGE_PAGES.split("=")[0] in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return
    if not libc.startswith("glibc"):
        return
    tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES"), HUGE_PAGES) if t)
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": tunables})


def main(argv: Sequence[str] | None = None) -> int:
    """The `es3` command line (`argv`: its arguments, default `sys.argv[1:]`; given, as by a caller
    in the same process, the process is never restarted)."""
    if argv is None:
        _restart_with_huge_pages()
    _drop_closed_loop_reports()
    _cpu_without_nvidia_driver()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if unknown := merge_overrides(args, extra):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _command_module(args.command).run(args)
    except Es3Error as e:
        print(f"es3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C outside a training loop (which saves and stops on its own): the shell's status.
        print(f"es3 {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
