"""Merge trained es3 modules into a SAM3 (or stage-1) PyTorch checkpoint: `efficient_sam3_full.pt`.

The output is the base checkpoint's `model` dict with every key kept byte for byte, except:

* the teacher's memory attention (`tracker.transformer.encoder.*`) is replaced by the student's
  (any number of layers, same key names, so upstream sam3 reads it unchanged);
* the student's Perceiver Resampler is added as `tracker.spatial_perceiver.*` (EdgeTAM's names);
* tracker modules a `TRAIN.MODE finetune` run trained replace the base's tensors of the same keys.

Both inputs come as `Weights` (`es3_jax.weights.load`, which the caller runs: porting/ does not
import the loader, which imports porting/). The student's configuration is recorded in the file
(`porting.checkpoint_file`); `porting.torch_student.load_efficient_sam3` builds the tracker from
it, and `es3_jax.weights.load` brings a merged file back into es3. The file is written atomically:
complete or absent.

EfficientSAM3's own merge wrote its temporal encodings in the wrong order and later dropped the
new modules altogether: here the student's keys come from
the same table the parity tests use (`porting.keymap.STUDENT_TABLE`), the teacher's temporal
encodings are kept, and nothing is written unless every key fits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from es3_jax import config as config_lib
from es3_jax.errors import Es3Error
from es3_jax.loaded_weights import Weights
from es3_jax.models.tracker import expected_param_shapes
from es3_jax.models.trunk import trunk_from_config
from es3_jax.outputs import check_writable
from es3_jax.params import abstract_shapes, check_shapes, flatten
from porting.checkpoint_contents import classify
from porting.checkpoint_file import FORMATS, config_record, write_checkpoint
from porting.keymap import TRACKER_TABLE, TRUNK_TABLE
from porting.sam3_checkpoint import STUDENT_PREFIXES, check_state_dict, student_to_torch

TEACHER_ENCODER_PREFIX = "tracker.transformer.encoder."


class ExportError(Es3Error):
    """An export that cannot be made (nothing to export, a base without a tracker, ...)."""


@dataclass
class MergeSummary:
    kept: int
    removed: list[str]
    added: list[str]
    replaced: list[str]

    def lines(self) -> list[str]:
        return [
            f"kept {self.kept} keys of the base unchanged",
            f"removed {len(self.removed)} keys of the teacher's memory attention / an earlier perceiver",
            f"added {len(self.added)} student keys (tracker.transformer.encoder.*, tracker.spatial_perceiver.*)",
            f"replaced {len(self.replaced)} keys with fine-tuned tracker modules",
        ]


def merge_state_dict(base: Mapping, stage2: Weights, source: str = "<base>") -> tuple[dict, MergeSummary]:
    """The merged `model` dict (torch tensors) and what changed; `base` is left untouched.

    stage2: what a run trained (`es3_jax.weights.load`): its `student` and/or `trained` tracker
    modules.
    """
    if stage2.student is None and not stage2.trained:
        raise ExportError(
            f"{stage2.source}: holds no student and no fine-tuned tracker modules (a plain teacher, e.g. "
            "`es3 port` output): nothing to export"
        )
    if not any(k.startswith("tracker.") for k in base):
        raise ExportError(
            f"{source}: no tracker.* keys: the base must be a sam3.pt-layout checkpoint holding the SAM3 "
            "tracker (Meta's sam3.pt or a stage-1 merged file), not a transformers or detector-only file"
        )
    if stage2.student is not None and not any(k.startswith(TEACHER_ENCODER_PREFIX) for k in base):
        raise ExportError(
            f"{source}: the tracker has no memory attention ({TEACHER_ENCODER_PREFIX}*) to replace"
        )
    drop = STUDENT_PREFIXES if stage2.student is not None else ()
    merged = {k: v for k, v in base.items() if not (drop and k.startswith(drop))}
    removed = [k for k in base if drop and k.startswith(drop)]
    finetuned = {}
    for path, value in flatten(stage2.trained).items():
        key, transform = TRACKER_TABLE.to_torch(path)
        finetuned[key] = transform.to_torch(np.asarray(value))
    check_shapes(
        {k: v.shape for k, v in finetuned.items()},
        {k: tuple(base[k].shape) for k in finetuned if k in base},
        f"{source}: the fine-tuned modules of {stage2.source} do not fit the base",
    )
    for key, value in finetuned.items():
        merged[key] = torch.from_numpy(np.ascontiguousarray(value)).to(base[key].dtype)
    added = []
    if stage2.student is not None:
        for key, value in student_to_torch(stage2.student).items():
            merged[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
            added.append(key)
    kept = len(base) - len(removed) - len(finetuned)
    return merged, MergeSummary(kept, removed, added, list(finetuned))


def check_merged(merged: Mapping, cfg: config_lib.Config, memory: str, source: str) -> None:
    """ParamMismatchError naming each key and both shapes unless the merged file's tracker, neck and
    SAM3 ViT trunk (those of the base, with what the run trained) are exactly what its recorded
    config describes: what `es3 port` and `load_efficient_sam3` will demand of it. The student's
    keys were checked against the same config when the run was read."""
    expected = expected_param_shapes(cfg.MODEL.TEACHER)
    tracker = merged
    if memory == "student":
        tracker = {k: v for k, v in merged.items() if not k.startswith(STUDENT_PREFIXES)}
        expected = {p: s for p, s in expected.items() if not p.startswith("memory_attention.")}
    what = "the base does not fit the model of the run (the config recorded in the export)"
    check_state_dict(tracker, table=TRACKER_TABLE, expected=expected, source=source, what=what)
    contents = classify(merged, source=source)
    if contents.trunk_kind == config_lib.SAM3_VIT:
        trunk = contents.trunk
        shapes = abstract_shapes(lambda: trunk_from_config(cfg))
        expected = {f"trunk.{p}": s for p, s in shapes.items()}
        check_state_dict(trunk, table=TRUNK_TABLE, expected=expected, source=source, what=what)


def es3_tracker_state_dict(weights: Weights) -> dict:
    """The tracker (and tracker neck) of es3 weights in the sam3.pt layout, as a base to merge into
    when the teacher exists only in es3 (e.g. the demo's fine-tuned random teacher).

    `tracker.no_mem_pos_enc`, which upstream holds but never reads at inference, is written as zeros.
    """
    if weights.tracker is None:
        raise ExportError(f"{weights.source}: holds no tracker to merge into")
    sd = {}
    for path, value in flatten(weights.tracker).items():
        key, transform = TRACKER_TABLE.to_torch(path)
        sd[key] = torch.from_numpy(transform.to_torch(np.asarray(value, np.float32)))
    sd["tracker.no_mem_pos_enc"] = torch.zeros(1, 1, weights.cfg.MODEL.TEACHER.D_MODEL)
    return sd


@dataclass
class ExportResult:
    path: Path
    format: str
    summary: MergeSummary
    record: dict


def check_output(
    output_path: str | Path, base: str | Path, *, fmt: str = "auto", overwrite: bool = False
) -> tuple[Path, str]:
    """(output_path, its format) where `export_merged` may write the merge of `base` (the base's path)
    now; else ExportError (or OutputError). fmt: "pt", "safetensors" or "auto" (from the output's
    suffix). An existing output is replaced only with `overwrite`, and never the base. `es3 export`
    asks before it reads the inputs."""
    output_path = Path(output_path)
    if fmt == "auto":
        fmt = "safetensors" if output_path.suffix == ".safetensors" else "pt"
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if output_path.exists() and output_path.resolve() == Path(base).resolve():
        raise ExportError(f"--output_path {output_path} is the base checkpoint; write the merge elsewhere")
    if output_path.exists() and not overwrite:
        raise ExportError(f"{output_path} already exists; choose another --output_path or pass --overwrite")
    check_writable(output_path)
    return output_path, fmt


def export_merged(
    stage2: Weights, base: Weights, output_path: str | Path, *, fmt: str = "auto", overwrite: bool = False
) -> ExportResult:
    """Merge what a run trained into a base checkpoint and write `output_path` (`es3 export`).

    stage2: a run's weights (`es3_jax.weights.load` of a run, checkpoint or weights folder, its
    `student` part at least). base: `es3_jax.weights.load` of a sam3.pt-layout file (its tensors
    are kept as read) or of es3 weights holding the teacher (its tracker and neck become the
    base), under `stage2.cfg`; it must hold the tracker that config describes (`check_merged`).
    fmt, overwrite: see `check_output`. The base is never written to.
    """
    output_path, fmt = check_output(output_path, base.source, fmt=fmt, overwrite=overwrite)
    base_sd = base.state_dict if base.state_dict is not None else es3_tracker_state_dict(base)
    merged, summary = merge_state_dict(base_sd, stage2, base.source)
    memory = "student" if stage2.student is not None else "teacher"
    check_merged(merged, stage2.cfg, memory, base.source)
    record = config_record(
        stage2.cfg, memory, {"stage2_weights": stage2.source, "step": stage2.step, "base": base.source}
    )
    path = write_checkpoint(output_path, merged, record, fmt)
    return ExportResult(path, fmt, summary, record)
