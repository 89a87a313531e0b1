"""The `es3` command's help describes its commands and their options."""

import subprocess
import sys

import pytest

from es3_jax.cli import main


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
        ("train", ("--output_dir", "--resume", "ckpt_best", "SIGTERM", "TRAIN.MODE")),
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
