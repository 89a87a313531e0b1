"""Progress on long work: bars drawn on a terminal (silent when stderr goes to a log or a pipe), and
one line for a job of several phases."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from tqdm import tqdm


def progress_bar(total: int, desc: str, unit: str = "frame", enabled: bool = True) -> tqdm:
    """A tqdm bar of `total` units on stderr, drawn only when `enabled` and stderr is a terminal."""
    # disable=None is tqdm's "disable unless the output is a terminal".
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None if enabled else True)


@dataclass(frozen=True)
class Phase:
    """One phase of a job: what it does, and what it is expected to cost, `fixed_s + unit_s · units`
    seconds on the machine the costs were measured on."""

    label: str
    units: int
    unit_s: float
    fixed_s: float = 0.0
    unit: str = "step"

    @property
    def cost_s(self) -> float:
        return self.fixed_s + self.unit_s * self.units


def clock(seconds: float) -> str:
    """`4:05`, `1:02:03`."""
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class PhaseLine:
    """One progress line for a job of several phases, e.g.
    `demo 3/6 fine-tuning the teacher · step 412/600 · 2:31 elapsed · about 4:10 left`.

    The time left is the expected cost still ahead, scaled by how fast the job has gone so far
    against its expected cost. On a terminal the line redraws in place; in a log, a line is
    written at each phase and every `log_every_s`.
    """

    def __init__(
        self, name: str, phases: Sequence[Phase], *, stream: TextIO | None = None, log_every_s: float = 30.0
    ):
        self.name, self.phases = name, list(phases)
        self.stream = stream or sys.stderr
        self.log_every_s = log_every_s
        self.start_time = time.perf_counter()
        self.index = -1
        self.done = 0
        self._drawn_at = -math.inf
        self._width = 0

    def begin(self, index: int) -> None:
        """Phase `index` (of `phases`) starts."""
        self.index, self.done = index, 0
        self._draw(force=True)

    def update(self, done: int) -> None:
        """`done` units of the current phase are complete."""
        self.done = done
        self._draw(force=done >= self.phases[self.index].units)

    def close(self) -> None:
        if self.stream.isatty() and self._width:
            self.stream.write("\n")
            self.stream.flush()

    def remaining_s(self) -> float | None:
        """Seconds left by the estimate; None before the first phase has started."""
        if self.index < 0:
            return None
        behind = sum(p.cost_s for p in self.phases[: self.index])
        current = self.phases[self.index]
        if self.done:
            behind += current.fixed_s + current.unit_s * min(self.done, current.units)
        ahead = sum(p.cost_s for p in self.phases) - behind
        elapsed = time.perf_counter() - self.start_time
        # Until a tenth of the job is done, the measured pace says little: trust the costs.
        pace = elapsed / behind if behind > 0.1 * (behind + ahead) else 1.0
        return ahead * pace

    def text(self) -> str:
        phase = self.phases[self.index]
        parts = [f"{self.name} {self.index + 1}/{len(self.phases)} {phase.label}"]
        if phase.units > 1:
            parts.append(f"{phase.unit} {self.done}/{phase.units}")
        parts.append(f"{clock(time.perf_counter() - self.start_time)} elapsed")
        parts.append(f"about {clock(self.remaining_s() or 0.0)} left")
        return " · ".join(parts)

    def _draw(self, force: bool) -> None:
        now = time.perf_counter()
        tty = self.stream.isatty()
        if not force and now - self._drawn_at < (0.5 if tty else self.log_every_s):
            return
        self._drawn_at = now
        line = self.text()
        if tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
