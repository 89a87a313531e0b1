"""The `es3` command's help describes its commands and their options; options may follow the
`KEY VALUE` overrides; an interrupted `es3 train` exits with 128 + the signal's number."""

import os
import signal
import subprocess
import sys
from typing import ClassVar

import pytest

from es3_jax import cli
from es3_jax.cli import main
from es3_jax.train import trainer


def test_top_level_help_lists_commands():
    run = subprocess.run([sys.executable, "-m", "es3_jax.cli", "--help"], capture_output=True, text=True)
    assert run.returncode == 0
    for word in ("demo", "make-synthetic", "embed", "train", "eval", "track", "port", "bench"):
        assert word in run.stdout


@pytest.mark.parametrize(
    ("command", "words"),
    [
        ("port", ("--sam3_weights", "--output_dir", "--config", "KEY VALUE", "stage-1", "strict")),
        ("demo", ("--output_dir", "--sam3_weights", "summary.json", "J&F")),
        ("train", ("--output_dir", "--resume", "ckpt_best", "SIGTERM", "TRAIN.MODE", "143", "130")),
    ],
)
def test_command_help(command, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in words:
        assert word in out, f"`es3 {command} --help` does not mention {word}"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().out


class _StoppedTrainer:
    """In place of the Trainer (no models built): records how it was made; its run is stopped by
    SIGTERM after step 1, its checkpoint saved."""

    made: ClassVar[list] = []

    def __init__(self, cfg, output_dir, *, resume=None):
        self.made.append((cfg, resume))
        self.process_index = 0

    def run(self) -> dict:
        return {"step": 1, "train": {"total": 1.0}, "val": {}, "stopped_by_signal": signal.SIGTERM}

    def export_weights(self):
        raise AssertionError("an interrupted run has no final weights")


def test_an_interrupted_train_exits_with_128_plus_the_signal(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(trainer, "Trainer", _StoppedTrainer)
    status = main(["train", "--output_dir", str(tmp_path), "TRAIN.MAX_STEPS", "7"])
    assert status == 128 + signal.SIGTERM == 143
    assert "stopped by SIGTERM at step 1 of 7 (saved); `--resume auto` continues" in capsys.readouterr().err


def test_options_may_follow_the_overrides(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(trainer, "Trainer", _StoppedTrainer)
    _StoppedTrainer.made.clear()
    overrides = ["TRAIN.MAX_STEPS", "7", "--resume", "auto", "TRAIN.LR", "0.5"]
    main(["train", "--output_dir", str(tmp_path), *overrides])
    ((cfg, resume),) = _StoppedTrainer.made
    assert resume == "auto" and cfg.TRAIN.MAX_STEPS == 7 and cfg.TRAIN.LR == 0.5
    # An unknown option where a KEY belongs is refused as argparse refuses it before the pairs.
    with pytest.raises(SystemExit) as refused:
        main(["train", "--output_dir", str(tmp_path), "TRAIN.LR", "0.5", "--resum_from", "x"])
    assert refused.value.code == 2 and "unrecognized arguments: --resum_from" in capsys.readouterr().err


def test_without_an_nvidia_driver_es3_runs_on_the_cpu_where_the_cuda_plugin_is_installed(monkeypatch):
    """JAX would probe CUDA first and print a traceback; es3 asks for the CPU unless told otherwise."""
    monkeypatch.setattr(cli, "installed", lambda module: True)
    monkeypatch.setattr(cli.os.path, "exists", lambda path: False)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    cli._cpu_without_nvidia_driver()
    assert os.environ["JAX_PLATFORMS"] == "cpu"

    monkeypatch.setenv("JAX_PLATFORMS", "cuda")  # the user's choice stands
    cli._cpu_without_nvidia_driver()
    assert os.environ["JAX_PLATFORMS"] == "cuda"

    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(cli.os.path, "exists", lambda path: path == "/dev/nvidiactl")  # a GPU host
    cli._cpu_without_nvidia_driver()
    assert "JAX_PLATFORMS" not in os.environ


def test_without_any_jax_plugin_es3_starts():
    """No plugin installed at all (JAX's `jax_plugins` namespace absent, as in a plain `pip install`),
    JAX_PLATFORMS unset: the probe for the CUDA plugin must not fail."""
    code = (
        "import sys; sys.modules['jax_plugins'] = None; "  # unimportable, whatever this machine has
        "sys.argv = ['es3', '--version']; from es3_jax import cli; sys.exit(cli.main())"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["GLIBC_TUNABLES"] = cli.HUGE_PAGES  # no restart: this process is the one probed
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith(cli.__version__), run.stdout


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"),
    reason="huge pages through glibc's tunables: Linux with glibc only",
)
def test_a_command_line_restarts_once_asking_glibc_for_huge_pages():
    code = (
        "import os, sys; print('GLIBC_TUNABLES', os.environ.get('GLIBC_TUNABLES'), flush=True); "
        "sys.argv = ['es3', '--version']; from es3_jax import cli; sys.exit(cli.main())"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=4"  # another tunable, kept
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "GLIBC_TUNABLES glibc.malloc.arena_max=4",
        f"GLIBC_TUNABLES glibc.malloc.arena_max=4:{cli.HUGE_PAGES}",
        f"es3-jax {cli.__version__}",
    ], run.stdout


def test_a_caller_in_the_same_process_is_never_restarted(monkeypatch, capsys):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail(f"main(argv) restarted the process: {a[:2]}"))
    with pytest.raises(SystemExit):
        main(["--version"])
