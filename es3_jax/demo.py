"""`es3 demo`: the main job end to end, small enough for a laptop CPU.

1. generate SA-V-format videos (`es3 make-synthetic`);
2. embed their frames with the frozen trunk (`es3 embed`);
3. fine-tune a tracker with random weights on the ground truth — the demo's teacher (with
   `--sam3_weights`, the real SAM3 tracker is the teacher and this step is skipped);
4. distil the student memory (Perceiver Resampler + 2-layer memory attention) from a random
   initialisation against that teacher;
5. evaluate on held-out videos, judge every figure against its target (`TARGETS`) and write
   `summary.json`;
6. export the student merged into the teacher as a PyTorch checkpoint (`es3 export`), when torch
   is installed.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax

from es3_jax import config as config_lib
from es3_jax import embed, weights
from es3_jax.data.synthetic import Style, make_synthetic
from es3_jax.errors import Es3Error, require_torch
from es3_jax.progress import Phase, PhaseLine, clock
from es3_jax.train.trainer import Trainer

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
# With the demo config, the distillation stage's TRAIN settings (the config's own are the fine-tuning
# stage's); another config's rule both stages. A distillation step costs two thirds of a fine-tuning
# one on a CPU. The student learns faster at a higher peak rate than the tracker: measured at 1200
# steps on 4 held-out videos, J&F vs the teacher 0.86 at 1e-3, 0.90 at 3e-3, 0.87 at 5e-3.
DEMO_DISTILL = {"MAX_STEPS": 900, "LR": 3e-3}
# Generated videos: at 24 the fine-tuned tracker and the student fit their 20 training videos
# better than held-out ones (student feature MSE 0.06 on training clips, 0.13 held out); at 120
# they are alike (0.087 and 0.094). Generating and embedding them takes half a minute.
DEMO_VIDEOS = 120
# The demo tracker sees 12 × 12 tokens of 14 px. Objects of 8-24 % of the frame span several tokens,
# and flat colours give its random trunk features that do not change with a texture's phase as an
# object moves. Measured after 1000 fine-tuning steps, held-out J&F: 0.55 with the default textured
# 3-20 % objects (4 memory-attention layers); 0.60 flat, 0.67 flat at 8-24 % (2 layers).
DEMO_STYLE = Style(textured=False, min_area=0.08, max_area=0.24)
# What each phase is expected to cost, in seconds, measured on a quiet 2-core AMD EPYC (docs/demo.md):
# the progress line's estimate of the time left scales them by the pace the run has kept so far.
GENERATE_S = 0.11  # per video
EMBED_S_PER_VIDEO = 0.075
FINETUNE_SETUP_S, FINETUNE_STEP_S = 71.0, 0.245  # trainer set-up and compilation; each step
DISTILL_SETUP_S, DISTILL_STEP_S = 57.0, 0.167  # ... and the student's evaluation at initialisation
EVALUATE_S = 3.0
EXPORT_S = 2.0


@dataclass(frozen=True)
class Target:
    """What a summary figure must reach for the demo to have learnt: `minimum ≤ value ≤ maximum`."""

    key: str
    label: str
    minimum: float = -math.inf
    maximum: float = math.inf

    def margin(self, value: float) -> float:
        """How far inside its bounds `value` is (negative: outside; NaN: not measured)."""
        return min(value - self.minimum, self.maximum - value)

    def text(self) -> str:
        if math.isinf(self.maximum):
            return f"≥ {self.minimum:g}"
        if math.isinf(self.minimum):
            return f"≤ {self.maximum:g}"
        return f"{self.minimum:g} – {self.maximum:g}"


TARGETS = (
    Target("teacher_jf_vs_gt", "teacher J&F vs ground truth", minimum=0.70),
    # A teacher that draws nothing, or everything, is not one to learn from.
    Target("teacher_mask_area_fraction", "teacher mask area (of the frame)", minimum=0.01, maximum=0.5),
    Target("student_feature_mse_drop", "student feature MSE drop", minimum=0.90),
    Target("student_jf_vs_teacher", "student J&F vs the teacher's masks", minimum=0.90),
)
# Printed beside the targets, judged by nothing.
FIGURES = (
    ("student_jf_vs_gt", "student J&F vs ground truth"),
    ("student_jf_vs_teacher_at_start", "student J&F vs the teacher at initialisation"),
)


def judge(summary: dict) -> list[dict]:
    """Each target with the summary's figure: `{key, figure, measured, target, margin, met}`."""
    rows = []
    for t in TARGETS:
        value = float(summary[t.key])
        margin = t.margin(value)
        rows.append(
            {
                "key": t.key,
                "figure": t.label,
                "measured": value,
                "target": t.text(),
                "margin": margin,
                "met": margin >= 0,
            }
        )
    return rows


def verdict(judged: list[dict]) -> str:
    """One line: every target met, or which figures fell short and by how much."""
    short = [r for r in judged if not r["met"]]
    if not short:
        return f"PASSED: all {len(judged)} targets met, the closest by {min(r['margin'] for r in judged):.3f}"
    return "FAILED: " + "; ".join(
        f"{r['figure']} {r['measured']:.3f} misses its target {r['target']}" for r in short
    )


def judgement_table(summary: dict) -> str:
    """The figures, their targets and margins, as printed at the end of a run."""
    lines = [f"{'figure':46s} {'measured':>9s} {'target':>11s} {'margin':>8s}"]
    for r in summary["judged"]:
        mark = "" if r["met"] else "  <- not met"
        lines.append(f"{r['figure']:46s} {r['measured']:9.3f} {r['target']:>11s} {r['margin']:+8.3f}{mark}")
    for key, label in FIGURES:
        lines.append(f"{label:46s} {summary[key]:9.3f}")
    lines.append(f"{'wall time':46s} {clock(summary['wall_time_s']):>9s}")
    lines.append(f"{'peak memory (GB)':46s} {summary['peak_memory_gb']:9.2f}")
    return "\n".join(lines) + "\n" + summary["verdict"]


def _phases(videos: int, finetune_steps: int | None, distill_steps: int) -> list[Phase]:
    phases = [
        Phase("generating videos", videos, GENERATE_S, unit="video"),
        Phase("embedding frames", 1, 0.0, fixed_s=EMBED_S_PER_VIDEO * videos),
    ]
    if finetune_steps is not None:
        phases.append(
            Phase("fine-tuning the teacher", finetune_steps, FINETUNE_STEP_S, fixed_s=FINETUNE_SETUP_S)
        )
    phases.append(Phase("distilling the student", distill_steps, DISTILL_STEP_S, fixed_s=DISTILL_SETUP_S))
    phases.append(Phase("evaluating on held-out videos", 1, 0.0, fixed_s=EVALUATE_S))
    phases.append(Phase("exporting to PyTorch", 1, 0.0, fixed_s=EXPORT_S))
    return phases


def run(
    output_dir: str | Path,
    *,
    config: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    sam3_weights: str | None = None,
    videos: int = DEMO_VIDEOS,
    finetune_steps: int | None = None,
    distill_steps: int | None = None,
    seed: int | None = None,
) -> dict:
    """Run every stage into `output_dir`, judge the figures against `TARGETS` -> the summary (also
    written as summary.json; `summary["passed"]` says whether every target was met).

    seed: `TRAIN.SEED`, which draws the videos, the random trunk and every initialisation."""
    start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_lib.load(config or DEMO_CONFIG, list(overrides))
    if config is None:
        # The demo config takes one batch per step on whatever devices the machine has.
        per_step = cfg.TRAIN.BATCH_SIZE * jax.device_count()
        cfg = config_lib.merge(cfg, {"TRAIN": {"EFFECTIVE_BATCH_SIZE": per_step}})
    if seed is not None:
        cfg = config_lib.merge(cfg, {"TRAIN": {"SEED": seed}})
    data_dir, store_dir = out / "data", out / "embeddings"
    cfg = config_lib.merge(cfg, {"DATA": {"SAV_ROOT": str(data_dir), "EMBEDDING_DIR": str(store_dir)}})
    ft_cfg = None
    if not sam3_weights:
        ft_cfg = config_lib.merge(cfg, {"TRAIN": {"MODE": "finetune"}})
        if finetune_steps is not None:
            ft_cfg = config_lib.merge(ft_cfg, {"TRAIN": {"MAX_STEPS": finetune_steps}})
        # The teacher is judged on the held-out videos by the distillation's evaluation.
        ft_cfg = config_lib.merge(ft_cfg, {"TRAIN": {"EVAL_EVERY": 0}})
    st_cfg = config_lib.merge(cfg, {"TRAIN": {"MODE": "distill"}})
    if config is None:
        st_cfg = config_lib.merge(st_cfg, {"TRAIN": DEMO_DISTILL})
    if distill_steps is not None:
        st_cfg = config_lib.merge(st_cfg, {"TRAIN": {"MAX_STEPS": distill_steps}})
    st_cfg = config_lib.merge(st_cfg, {"TRAIN": {"EVAL_EVERY": st_cfg.TRAIN.MAX_STEPS}})
    phases = _phases(videos, None if ft_cfg is None else ft_cfg.TRAIN.MAX_STEPS, st_cfg.TRAIN.MAX_STEPS)
    line = PhaseLine("demo", phases)
    marks: list[tuple[str, float]] = []  # (phase, when it began)
    first_steps: dict[str, float] = {}

    def begin(index: int, name: str) -> None:
        marks.append((name, time.perf_counter()))
        line.begin(index)

    def on_step(step: int) -> None:
        # The first step's time is the trainer's set-up and compilation.
        if step == 1:
            name, began = marks[-1]
            first_steps[f"{name}_first_step_s"] = time.perf_counter() - began
        line.update(step)

    index = iter(range(len(phases)))
    begin(next(index), "generate")
    make_synthetic(data_dir, videos, seed=cfg.TRAIN.SEED, style=DEMO_STYLE, on_progress=line.update)

    begin(next(index), "embed")
    trunk = weights.load(sam3_weights, cfg, seed=cfg.TRAIN.SEED, parts=(weights.TRUNK,))
    embed.run(cfg, str(data_dir), str(store_dir), weights=trunk, seed=cfg.TRAIN.SEED, progress=False)

    teacher_weights, teacher_run = sam3_weights, None
    if ft_cfg is not None:
        begin(next(index), "finetune")
        trainer = Trainer(ft_cfg, out / "teacher")
        teacher_run = trainer.run(on_step=on_step)
        teacher_weights = str(trainer.export_weights())

    begin(next(index), "distill")
    evaluate = next(index)
    trainer = Trainer(
        config_lib.merge(st_cfg, {"MODEL": {"TEACHER_WEIGHTS": teacher_weights}}), out / "student"
    )
    before = trainer.validate()

    def on_distill_step(step: int) -> None:
        on_step(step)
        if step == trainer.cfg.TRAIN.MAX_STEPS:  # the run's own evaluation follows its last step
            begin(evaluate, "evaluate")

    student_run = trainer.run(on_step=on_distill_step)
    student_weights = trainer.export_weights()
    after = student_run["val"]

    begin(next(index), "export")
    exported = _export(student_weights, teacher_weights, out / "efficient_sam3_full.pt")
    line.close()
    marks.append(("", time.perf_counter()))
    timings = {f"{name}_s": end - began for (name, began), (_, end) in itertools.pairwise(marks)}
    timings.update(first_steps)

    mse_start, mse_end = before["mse"], after["mse"]
    summary = {
        "teacher_jf_vs_gt": after["teacher_jf"],
        "teacher_mask_area_fraction": after["teacher_mask_area"],
        "student_feature_mse_start": mse_start,
        "student_feature_mse_end": mse_end,
        "student_feature_mse_drop": 1.0 - mse_end / mse_start if mse_start > 0 else math.nan,
        "student_jf_vs_teacher": after["jf_vs_teacher"],
        "student_jf_vs_gt": after["jf"],
        "student_jf_vs_teacher_at_start": before["jf_vs_teacher"],
        "seed": cfg.TRAIN.SEED,
        "videos": videos,
        "finetune_steps": None if teacher_run is None else teacher_run["step"],
        "distill_steps": student_run["step"],
        "teacher_weights": teacher_weights,
        "student_weights": str(student_weights),
        "pytorch_checkpoint": exported,
        "outputs": {
            "data": str(data_dir),
            "embeddings": str(store_dir),
            "teacher_run": None if teacher_run is None else str(out / "teacher"),
            "student_run": str(out / "student"),
        },
        "timings_s": timings,
        "wall_time_s": time.perf_counter() - start,
        "peak_memory_gb": peak_memory_gb(),
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "machine": machine(),
    }
    summary["judged"] = judge(summary)
    summary["passed"] = all(r["met"] for r in summary["judged"])
    summary["verdict"] = verdict(summary["judged"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def peak_memory_gb() -> float:
    """This process's peak resident memory so far, in GB (10⁹ bytes)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / 1e9 if sys.platform == "darwin" else kib * 1024 / 1e9


def machine() -> dict:
    """What ran the demo: the CPU's model, its cores, and JAX's devices."""
    model = platform.processor() or platform.machine()
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                model = row.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devices = jax.devices()
    return {"cpu": model, "cores": os.cpu_count(), "devices": f"{len(devices)} {devices[0].platform}"}


def commit() -> str | None:
    """The es3 checkout's commit (`+` when it has uncommitted changes); None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+" if dirty else "")


def _export(student_weights: Path, teacher_weights: str, output_path: Path) -> str | None:
    """The merged PyTorch file's path, or None (with the reason printed) where torch is missing."""
    try:
        require_torch("the PyTorch export")
    except Es3Error as e:
        print(f"skipped: {e}", flush=True)
        return None
    from porting.export import export_merged  # porting imports torch

    student = weights.load(student_weights, parts=(weights.STUDENT,))
    teacher = weights.load(teacher_weights, student.cfg, parts=("tracker",))
    return str(export_merged(student, teacher, output_path, overwrite=True).path)
