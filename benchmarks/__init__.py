"""The benchmarks `es3 bench <name>` runs; one module per benchmark.

Each module defines `HELP`, `add_arguments(parser)` and `run(args) -> list[dict]` (one record per
measured case); `es3 bench` prints the records as a table, or as JSON lines with `--json`.
PyTorch references come from `porting/`, the only place that imports torch.

`es3 --help` builds every benchmark's parser, so a module imports only light modules at its top
(the config, the harness) and the heavy ones (jax, the models, torch through porting) in the
functions that measure; `plan` must also set its fake devices before jax starts.
"""
