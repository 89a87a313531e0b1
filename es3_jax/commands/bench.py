"""`es3 bench <name>`: the speed and size benchmarks (modules under `benchmarks/`)."""

from __future__ import annotations

import argparse
import importlib
import sys

HELP = "benchmarks: speed and size figures, with the PyTorch teacher beside ours"
DESCRIPTION = """\
Run one benchmark and print its records as a table (or JSON lines with --json).
Every timing is of jit-compiled, warmed code: the median of repeated runs."""

# Benchmark name -> module under benchmarks/.
BENCHMARKS: dict[str, str] = {
    "store": "store",
    "data": "data",
    "embed": "embed",
    "memory-attention": "memory_attention",
    "train": "train",
    "plan": "plan",
    "gpu-compile": "gpu_compile",
    "track": "track",
    "onnx": "onnx",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from es3_jax.commands.common import Formatter

    sub = p.add_subparsers(dest="benchmark", metavar="<benchmark>", required=True)
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(f"benchmarks.{module_name}")
        b = sub.add_parser(name, help=module.HELP, description=module.HELP, formatter_class=Formatter)
        b.add_argument("--json", action="store_true", help="print one JSON record per line")
        b.add_argument("--output", default=None, help="also write the records to this JSON-lines file")
        module.add_arguments(b)


def run(args: argparse.Namespace) -> int:
    from benchmarks.harness import format_json, format_table

    module = importlib.import_module(f"benchmarks.{BENCHMARKS[args.benchmark]}")
    records = module.run(args)
    print(format_json(records) if args.json else format_table(records))
    if args.output:
        with open(args.output, "w") as f:
            f.write(format_json(records) + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
