"""One module per `es3` subcommand.

Each module defines `HELP` (one line for `es3 --help`), `DESCRIPTION`, `add_arguments(parser)` and
`run(args) -> int`. A module imports only light modules at its top; `run` imports the heavy ones
(jax, flax and the models, torch through porting), so that `es3 --help` stays instant.
"""
