"""`es3 train` survives `kill -9`: a run killed after its step-10 checkpoint and resumed reaches step 20
with the parameters and the loss log of a run that was never interrupted."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from es3_jax import weights
from es3_jax.params import flatten
from tests.train.runs import MICRO, cli_env, synthetic_store


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("resume"), 6, MICRO)


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
