"""`es3 train` survives `kill -9`: a run killed after its step-10 checkpoint and resumed reaches step 20
with the parameters and the loss log of a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from es3_jax import config as config_lib
from es3_jax import embed
from es3_jax.data.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[2]

# 56 px frames -> a 4 × 4 grid, a 1-block trunk of width 16: every step is a fraction of a second.
MICRO = [
    "MODEL.TEACHER.IMAGE_SIZE", "56", "MODEL.TEACHER.TRUNK_DIM", "16", "MODEL.TEACHER.D_MODEL", "32",
    "MODEL.TEACHER.MEM_DIM", "16", "MODEL.TEACHER.MEMORY_ATTENTION_FFN_DIM", "64",
    "MODEL.TEACHER.DECODER_MLP_DIM", "64", "MODEL.TEACHER.DECODER_HEADS", "4",
    "MODEL.TRUNK.WIDTH", "16", "MODEL.TRUNK.NUM_HEADS", "2", "MODEL.TRUNK.MLP_DIM", "32", "MODEL.TRUNK.DEPTH", "1",
    "MODEL.TRUNK.GLOBAL_BLOCKS", "[0]", "MODEL.TRUNK.WINDOW_SIZE", "4", "MODEL.TRUNK.PRETRAIN_IMAGE_SIZE", "56",
    "MODEL.PERCEIVER.NUM_LATENTS", "4", "MODEL.PERCEIVER.NUM_LATENTS_2D", "4", "MODEL.PERCEIVER.WINDOW_SIZE", "2",
    "DATA.NUM_FRAMES", "3", "DATA.MAX_OBJECTS", "2", "DATA.NUM_WORKERS", "0", "DATA.VAL_VIDEOS", "2",
    "DATA.EMBEDDING_DTYPE", "float32", "TRAIN.BATCH_SIZE", "2", "TRAIN.EFFECTIVE_BATCH_SIZE", "2",
    "TRAIN.MAX_STEPS", "20", "TRAIN.WARMUP_STEPS", "2", "TRAIN.SAVE_EVERY", "10", "TRAIN.EVAL_EVERY", "0",
    "LOG.EVERY", "1", "LOG.TENSORBOARD", "False",
]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    make_synthetic(root / "data", 6, num_frames=8, height=64, width=80)
    overrides = [*MICRO, "DATA.SAV_ROOT", str(root / "data"), "DATA.EMBEDDING_DIR", str(root / "emb")]
    embed.run(config_lib.load(None, overrides), str(root / "data"), str(root / "emb"), progress=False)
    return overrides


def _train(out: Path, overrides, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "es3_jax.cli", "train", "--output_dir", str(out), *extra, *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _final(out: Path) -> tuple[dict, list[dict]]:
    from es3_jax import tracker_weights
    from es3_jax.params import flatten

    params, _ = tracker_weights.load(out / "weights")
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [{k: r[k] for k in ("step", "total", "focal", "dice", "iou", "mse")} for r in log]
    return flatten(params["student"]), losses


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
