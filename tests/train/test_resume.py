"""`es3 train` stops and starts again: a run killed after its step-10 checkpoint and resumed reaches
step 20 with the parameters and the loss log of a run that was never interrupted; SIGTERM saves
the step once and reports the stop; a start that fails leaves the output folder as it was."""

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optax
import pytest

from es3_jax import config as config_lib
from es3_jax import weights
from es3_jax.cli import main
from es3_jax.params import flatten
from es3_jax.train.metrics_log import MetricsLog
from es3_jax.train.trainer import Trainer
from tests.train.runs import MICRO, cli_env, synthetic_store


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 10 videos: a global batch of 8 (one per device of the test session) and 2 held out.
    return synthetic_store(tmp_path_factory.mktemp("resume"), 10, MICRO)


def _train(out: Path, overrides, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "es3_jax.cli", "train", "--output_dir", str(out), *extra, *overrides]
    return subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _final(out: Path) -> tuple[dict, list[dict]]:
    student = weights.load(out / "weights").student
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [{k: r[k] for k in ("step", "total", "focal", "dice", "iou", "mse")} for r in log]
    return flatten(student), losses


@pytest.mark.slow
def test_kill_9_after_step_10_then_resume_equals_a_straight_run(dataset, tmp_path):
    straight = _train(tmp_path / "straight", dataset)
    assert straight.wait(timeout=900) == 0, straight.stdout.read()

    killed = _train(tmp_path / "killed", dataset)
    step10 = tmp_path / "killed" / "checkpoints" / "10"
    deadline = time.time() + 900
    while (
        not (step10.is_dir() and any(step10.iterdir())) and killed.poll() is None and time.time() < deadline
    ):
        time.sleep(0.05)
    assert killed.poll() is None, "the run finished before it could be killed: " + killed.stdout.read()
    killed.send_signal(signal.SIGKILL)
    killed.wait()

    resumed = _train(tmp_path / "killed", dataset, "--resume", "auto")
    assert resumed.wait(timeout=900) == 0, resumed.stdout.read()

    params_a, log_a = _final(tmp_path / "straight")
    params_b, log_b = _final(tmp_path / "killed")
    assert [r["step"] for r in log_b] == list(range(1, 21))
    worst = max(float(np.max(np.abs(params_a[k] - params_b[k]))) for k in params_a)
    print(f"[resume] max |params(straight) - params(killed at 10, resumed)| = {worst:.2e}")
    assert worst <= 1e-6
    for a, b in zip(log_a, log_b, strict=True):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), f"step {a['step']} {k}: {a[k]} vs {b[k]}"


class _Learner:
    """In place of the models: one small trainable array, steps that report a finite loss, and at
    step `signal_at` a SIGTERM to this process, as a scheduler sends it."""

    def __init__(self, signal_at: int):
        self.trainable = {"w": np.arange(6, dtype=np.float32)}
        self.opt_state = optax.adam(1e-3).init(self.trainable)
        self.signal_at, self.steps = signal_at, 0

    def step(self, batch):
        self.steps += 1
        if self.steps == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"finite": True, "total": 1.0}


def _bare_trainer(output_dir: Path, overrides: list[str], learner: _Learner) -> Trainer:
    """A Trainer whose models and data are left out (building them compiles for minutes): its
    `run()` loop with the real checkpoints, log and signal handling, on `learner`."""
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = config_lib.load(None, [*overrides, "TRAIN.EVAL_EVERY", "0", "LOG.TENSORBOARD", "False"])
    trainer.output_dir, trainer.learner, trainer.process_index = output_dir, learner, 0
    trainer.accumulate, trainer.mesh = 1, SimpleNamespace(size=1)
    trainer.train_data = SimpleNamespace(
        iterator=lambda start_step: itertools.repeat({"source": np.zeros(1, np.int32)}), sources=("videos",)
    )
    trainer._global = lambda batch: batch
    trainer.micro = trainer.step = trainer.bad_steps = 0
    trainer.best = -math.inf
    trainer._checkpoints = trainer._saved_step = trainer._stop_signal = None
    trainer.log = MetricsLog(output_dir, tensorboard=False)
    return trainer


@pytest.mark.parametrize(("max_steps", "stopped"), [(3, signal.SIGTERM), (2, None)])
def test_sigterm_right_after_a_periodic_save_saves_once(tmp_path, max_steps, stopped):
    """SIGTERM during step 2 with TRAIN.SAVE_EVERY 1: the periodic save of step 2 is the one the stop
    needs (a second save of it was orbax's StepAlreadyExistsError). During the last step the signal
    stops nothing: the run is complete."""
    trainer = _bare_trainer(
        tmp_path, ["TRAIN.MAX_STEPS", str(max_steps), "TRAIN.SAVE_EVERY", "1"], _Learner(2)
    )
    result = trainer.run()
    assert result["step"] == 2 and result["stopped_by_signal"] == stopped
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [1, 2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the caller's again


def test_a_start_that_fails_leaves_the_output_folder_as_it_was(dataset, tmp_path, capsys):
    """A resume target that does not exist, with data that does: nothing written, not even the
    folder of the checkpoints the run would have saved."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    missing = tmp_path / "elsewhere" / "ckpt_step_3"
    batch = ["TRAIN.BATCH_SIZE", "1", "TRAIN.EFFECTIVE_BATCH_SIZE", "8"]  # the session's 8 devices
    assert main(["train", "--output_dir", str(out), "--resume", str(missing), *dataset, *batch]) == 2
    assert f"{missing}: no checkpoints/ folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
