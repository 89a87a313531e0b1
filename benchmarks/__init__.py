"""The benchmarks `es3 bench <name>` runs; one module per benchmark.

Each module defines `HELP`, `add_arguments(parser)` and `run(args) -> list[dict]` (one record per
measured case); `es3 bench` prints the records as a table, or as JSON lines with `--json`.
PyTorch references come from `porting/`, the only place that imports torch.
"""
