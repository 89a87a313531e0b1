"""Timing and reporting shared by the benchmarks."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def block(x: Any) -> Any:
    """Wait for every array in `x` (JAX dispatch is asynchronous; torch on CPU is not)."""
    import jax

    return jax.block_until_ready(x)


def time_call(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 10) -> dict[str, float]:
    """Run `fn` `warmup` times unmeasured (compilation, caches), then `repeats` times.

    `fn` must return only when its work is done (use `block` on JAX outputs).
    Returns `median_ms`, `min_ms`, `max_ms` and `repeats`.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "repeats": repeats,
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(records: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Records as an aligned text table; `columns` defaults to every key in first-seen order."""
    if not records:
        return "(no records)"
    if columns is None:
        columns = list(dict.fromkeys(k for r in records for k in r))
    rows = [[_cell(r.get(c, "")) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out)


def format_json(records: Sequence[dict[str, Any]]) -> str:
    """One JSON object per line."""
    return "\n".join(json.dumps(r, sort_keys=False) for r in records)
