"""Progress bars: drawn on a terminal only, and never when disabled."""

import io

import pytest

from es3_jax.progress import Phase, PhaseLine, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_a_terminal_only(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with progress_bar(3, "work", unit="video") as bar:
        bar.update(3)
    assert "work" in terminal.getvalue() and "3/3" in terminal.getvalue()

    quiet = _Terminal()
    monkeypatch.setattr("sys.stderr", quiet)
    with progress_bar(3, "work", enabled=False) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""

    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    with progress_bar(3, "work") as bar:
        bar.update(3)
    assert log.getvalue() == ""


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_phase_line_estimates_what_remains_from_the_pace_so_far(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr("es3_jax.progress.time.perf_counter", clock)
    log = io.StringIO()
    phases = [Phase("warming up", 1, 0.0, fixed_s=10.0), Phase("training", 100, 1.0, fixed_s=40.0)]
    line = PhaseLine("job", phases, stream=log, log_every_s=30.0)
    assert line.remaining_s() is None
    line.begin(0)
    assert line.remaining_s() == pytest.approx(150.0), "before any work is done the costs are the estimate"
    # The first phase took twice its expected 10 s, and the first half of training (40 + 50 s
    # expected) twice its cost too: what remains (50 s) is expected to take 100 s.
    clock.now = 20.0
    line.begin(1)
    clock.now = 200.0
    line.update(50)
    assert line.remaining_s() == pytest.approx(100.0)
    assert line.text() == "job 2/2 training · step 50/100 · 3:20 elapsed · about 1:40 left"
    clock.now = 210.0
    line.update(51)  # ten seconds after the last line written to a log: not written
    clock.now = 300.0
    line.update(100)
    line.close()
    lines = log.getvalue().splitlines()
    assert [ln.split(" · ")[0] for ln in lines] == [
        "job 1/2 warming up",
        "job 2/2 training",
        "job 2/2 training",
        "job 2/2 training",
    ]
    assert lines[-1].endswith("about 0:00 left") and "step 100/100" in lines[-1]


def test_phase_line_redraws_one_line_on_a_terminal():
    terminal = _Terminal()
    line = PhaseLine(
        "job", [Phase("a", 1, 0.0, fixed_s=1.0), Phase("b", 1, 0.0, fixed_s=1.0)], stream=terminal
    )
    line.begin(0)
    line.begin(1)
    line.close()
    out = terminal.getvalue()
    assert out.count("\n") == 1 and out.endswith("\n") and out.count("\r") == 2
