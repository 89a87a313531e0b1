"""One module per `es3` subcommand.

Each module defines `HELP` (one line for `es3 --help`), `DESCRIPTION`, `add_arguments(parser)` and
`run(args) -> int`, and imports nothing heavy at module level, so that `es3 --help` stays instant.
"""
