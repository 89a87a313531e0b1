"""Progress bars on long work: drawn on a terminal, silent when stderr goes to a log or a pipe."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, desc: str, unit: str = "frame", enabled: bool = True) -> tqdm:
    """A tqdm bar of `total` units on stderr, drawn only when `enabled` and stderr is a terminal."""
    # disable=None is tqdm's "disable unless the output is a terminal".
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None if enabled else True)
