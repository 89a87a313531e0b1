"""`es3 demo` end to end at a few steps, as `make demo` runs it (its own process, this machine's one
CPU device): every stage runs, and the summary and outputs are real. One layer in the SAM decoder and
the perceiver: their depth proves nothing here and costs compile time."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from es3_jax import weights
from tests.train.runs import cli_env

torch = pytest.importorskip("torch")
from porting.sam3_checkpoint import student_to_torch  # noqa: E402


def test_demo_runs_every_stage_and_fails_a_run_that_did_not_learn(tmp_path):
    """Two steps of each training learn nothing: every stage still runs and writes its outputs, and
    the run exits 1 naming the targets it missed."""
    cmd = [sys.executable, "-m", "es3_jax.cli", "demo", "--output_dir", str(tmp_path), "--videos", "6",
           "--finetune_steps", "2", "--distill_steps", "2", "DATA.VAL_VIDEOS", "2", "TRAIN.BATCH_SIZE", "1",
           "MODEL.TEACHER.DECODER_DEPTH", "1", "MODEL.PERCEIVER.DEPTH", "1"]  # fmt: skip
    run = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=1200)
    log = run.stdout[-3000:] + run.stderr[-3000:]
    assert run.returncode == 1, log
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert f"wrote {tmp_path}/summary.json" in run.stdout
    assert not summary["passed"] and summary["verdict"].startswith("FAILED"), summary["verdict"]
    missed = [r for r in summary["judged"] if not r["met"]]
    assert any(r["key"] == "student_jf_vs_teacher" for r in missed), summary["judged"]
    for r in missed:
        assert r["figure"] in summary["verdict"] and f"{r['figure']}" in run.stdout, r
    assert summary["verdict"] in run.stdout, "the verdict line is not printed"
    assert summary["peak_memory_gb"] > 0 and summary["machine"]["cores"] >= 1
    assert {"generate_s", "embed_s", "finetune_s", "finetune_first_step_s", "distill_s", "evaluate_s"} <= set(
        summary["timings_s"]
    ), summary["timings_s"]

    for key in (
        "teacher_jf_vs_gt",
        "teacher_mask_area_fraction",
        "student_feature_mse_start",
        "student_feature_mse_end",
        "student_jf_vs_teacher",
        "student_jf_vs_gt",
        "wall_time_s",
    ):
        assert math.isfinite(summary[key]), f"summary[{key!r}] = {summary[key]}"
    assert 0.0 <= summary["teacher_jf_vs_gt"] <= 1.0 and 0.0 <= summary["student_jf_vs_teacher"] <= 1.0
    assert summary["student_feature_mse_start"] > 0
    assert summary["finetune_steps"] == 2 and summary["distill_steps"] == 2
    for name, path in summary["outputs"].items():
        assert Path(path).is_dir(), f"outputs[{name!r}] {path} is missing"

    merged = torch.load(summary["pytorch_checkpoint"], map_location="cpu", weights_only=True)
    model = merged["model"]
    assert any(k.startswith("tracker.spatial_perceiver.") for k in model), "student perceiver not exported"
    student = student_to_torch(weights.load(summary["student_weights"]).student)
    for key, value in student.items():
        np.testing.assert_array_equal(model[key].numpy(), value, err_msg=f"exported {key}")
    teachers = {k for k in model if k.startswith("tracker.transformer.encoder.")} - set(student)
    assert not teachers, f"the teacher's memory attention survived the merge: {sorted(teachers)[:4]}"
