"""Progress bars: drawn on a terminal only, and never when disabled."""

import io

from es3_jax.progress import progress_bar


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
