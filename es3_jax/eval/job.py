"""The `es3 eval` job: a dataset's videos tracked from their ground truth and scored, or existing
predictions scored, with the official tools' conventions (`vos`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from es3_jax.data import datasets
from es3_jax.data.videos import DatasetError, VosVideo
from es3_jax.eval import vos
from es3_jax.eval.metrics import EvalError


@dataclasses.dataclass(frozen=True)
class EvalJob:
    """What to track and score: a val/test root of `dataset`'s format, its split (or `sequences`)."""

    dataset: str
    data_root: str | Path
    output_dir: Path
    split: str = "val"
    sequences: Sequence[str] | None = None
    resolution: str = "480p"
    skip_first_and_last: bool = True  # the official protocol; False also scores them


def open_videos(job: EvalJob) -> tuple[list[VosVideo], dict[str, list[str]]]:
    """The job's videos, every annotated frame checked, and per video the objects that are empty on
    every annotated frame (no prompt: neither tracked nor scored)."""
    if not job.data_root:
        raise DatasetError("no dataset root: give --data_root (or EVAL.DATA_ROOT)")
    videos = datasets.open_dataset(
        job.dataset, job.data_root, split=job.split, sequences=job.sequences, resolution=job.resolution
    )
    return videos, vos.check_videos(videos)


def evaluate(
    job: EvalJob,
    predictor: vos.Predictor,
    videos: Sequence[VosVideo],
    not_scored: dict[str, list[str]],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Track `videos` (`open_videos`) with `predictor`, write the predictions in the dataset's layout
    under `output_dir/predictions`, score them and write the results -> the summary (`extra` added)."""
    out = Path(job.output_dir)
    timing = vos.propagate_dataset(predictor, videos, out / "predictions")
    _, annotations = datasets.dataset_dirs(job.dataset, job.data_root, job.resolution)
    layout = videos[0].layout
    results = vos.score(
        out / "predictions",
        annotations,
        layout,
        [v.name for v in videos],
        skip_first_and_last=job.skip_first_and_last,
        leave_out=not_scored,
    )
    extra = {"dataset": job.dataset, **extra, "objects_not_scored": not_scored, **timing}
    return vos.write_results(out, results, layout, extra)


def score_predictions(
    pred_root: str | Path | None,
    gt_root: str | Path | None,
    layout: str | None,
    output_dir: Path,
    *,
    sequences: Sequence[str] | None = None,
    resolution: str = "480p",
    skip_first_and_last: bool = True,
) -> dict[str, Any]:
    """Predictions of any tracker (one folder per sequence) scored against the ground truth with
    `layout`'s conventions -> the summary written under `output_dir`. A dataset root is accepted
    for `gt_root`, as the sav tool accepts it."""
    if not (pred_root and gt_root and layout):
        raise EvalError("--score_only needs --pred_root, --gt_root and --layout")
    gt_root = Path(gt_root)
    for sub in (Path("Annotations") / resolution, Path("Annotations_6fps")):
        if (gt_root / sub).is_dir():
            gt_root = gt_root / sub
    results = vos.score(pred_root, gt_root, layout, sequences, skip_first_and_last=skip_first_and_last)
    return vos.write_results(output_dir, results, layout)
