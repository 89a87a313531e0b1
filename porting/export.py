"""Merge trained es3 modules into a SAM3 (or stage-1) PyTorch checkpoint: `efficient_sam3_full.pt`.

DESIGN.md D12. The output is the base checkpoint's `model` dict with every key kept byte for
byte, except:

* the teacher's memory attention (`tracker.transformer.encoder.*`) is replaced by the student's
  (any number of layers, same key names, so upstream sam3 reads it unchanged);
* the student's Perceiver Resampler is added as `tracker.spatial_perceiver.*` (EdgeTAM's names);
* tracker modules a `TRAIN.MODE finetune` run trained replace the base's tensors of the same keys.

The student's configuration (MODEL.TEACHER / TRUNK / PERCEIVER / MEMORY_ATTENTION) is recorded in
the file: `ckpt["es3_config"]` in a `.pt`, the `es3_config` metadata entry (JSON) of a
`.safetensors`. `porting.torch_student.load_efficient_sam3` builds the tracker from it, and
`port_merged` brings a merged file back into es3. The file is written to a temporary name in
the target folder, synced and renamed, so it is either complete or absent.

EfficientSAM3's own merge wrote its temporal encodings in the wrong order and later dropped the
new modules altogether (reference/memory_compression.md §4.10): here the student's keys come from
the same table the parity tests use (`porting.keymap.STUDENT_TABLE`), the teacher's temporal
encodings are kept, and nothing is written unless every key fits.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from es3_jax import config as config_lib
from es3_jax.errors import Es3Error
from es3_jax.params import abstract_shapes, flatten, unflatten

RECORD_KEY = "es3_config"
RECORD_FORMAT = "es3-efficient-sam3"
RECORD_VERSION = 1
TEACHER_ENCODER_PREFIX = "tracker.transformer.encoder."
PERCEIVER_PREFIX = "tracker.spatial_perceiver."
STUDENT_PREFIXES = (TEACHER_ENCODER_PREFIX, PERCEIVER_PREFIX)
RECORDED_SECTIONS = ("TEACHER", "TRUNK", "PERCEIVER", "MEMORY_ATTENTION")
FORMATS = ("pt", "safetensors")


class ExportError(Es3Error):
    """An export that cannot be made (mismatched config, a base without a tracker, ...); names the key."""


# --- What a run produced --------------------------------------------------------------------


@dataclass
class Stage2Weights:
    """The trained modules of an es3 run, with the config that describes them."""

    cfg: config_lib.Config
    student: dict | None  # {"memory_attention": ..., "spatial_perceiver": ...} or None
    tracker: dict = field(default_factory=dict)  # fine-tuned tracker modules, by es3 path
    source: str = ""
    step: int | None = None


def _config_from(path: Path, config: str | Path | None, overrides: Sequence[str], meta_cfg: dict | None):
    if config is not None:
        return config_lib.load(config, overrides), str(config)
    if path.is_file():
        return config_lib.load(path, overrides), str(path)
    if meta_cfg is not None:
        return config_lib.validate(
            config_lib.apply_overrides(config_lib.merge(config_lib.Config(), meta_cfg), overrides)
        ), "the checkpoint's meta"
    raise ExportError(
        f"{path} not found: the run's config is needed to describe the student (or pass --config)"
    )


def _check_shapes(flat: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], what: str, table) -> None:
    """Refuse parameters that do not fit the config, naming each es3 path, its torch key and both shapes."""

    def name(path: str) -> str:
        hit = table.to_torch(path)
        return f"{path} ({hit[0]})" if hit else path

    lines = [
        f"  missing from the checkpoint: {name(p)}, config shape {expected[p]}"
        for p in sorted(set(expected) - set(flat))
    ]
    lines += [
        f"  not in the config: {name(p)}, checkpoint shape {tuple(np.shape(flat[p]))}"
        for p in sorted(set(flat) - set(expected))
    ]
    lines += [
        f"  shape mismatch: {name(p)}: checkpoint {tuple(np.shape(flat[p]))}, config {expected[p]}"
        for p in sorted(set(flat) & set(expected))
        if tuple(np.shape(flat[p])) != tuple(expected[p])
    ]
    if lines:
        raise ExportError("\n".join([f"{what}:", *lines]))


def _student_shapes(cfg: config_lib.Config) -> dict[str, tuple[int, ...]]:
    from es3_jax.models.student import student_from_config

    return abstract_shapes(lambda: student_from_config(cfg, seed=0))


def read_stage2(
    path: str | Path, *, config: str | Path | None = None, overrides: Sequence[str] = ()
) -> Stage2Weights:
    """The trained modules of a run: `path` is a run folder (its latest checkpoint), a checkpoint
    (`<run>/ckpt_best`, `ckpt_latest`, `ckpt_step_N`, `<run>/checkpoints/N`; a seed-style `.pth`
    suffix is ignored) or an es3 weights folder (`<run>/weights`, what `es3 train` writes at the end).

    The config is the run's `config.yaml` (or `config` + `overrides`); the parameters must have
    exactly the shapes it describes.
    """
    from porting.keymap import STUDENT_TABLE, TRACKER_TABLE

    path = Path(path)
    if path.suffix == ".pth" and not path.exists():
        path = path.with_suffix("")
    if (path / "params").is_dir() and (path / "config.yaml").is_file():
        return _read_weights_folder(path, config, overrides)
    from es3_jax.train import checkpoint

    try:
        ref = checkpoint.resolve(path)
    except checkpoint.CheckpointNotFoundError as e:
        raise ExportError(
            f"--stage2_weights {path}: neither an es3 weights folder (params/ + config.yaml) nor a training "
            f"checkpoint: {e}"
        ) from e
    import orbax.checkpoint as ocp

    mgr = checkpoint.manager(ref.output_dir, read_only=True)
    restored = mgr.restore(
        ref.step, args=ocp.args.Composite(params=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    )
    meta = restored["meta"]
    cfg, cfg_source = _config_from(ref.output_dir / "config.yaml", config, overrides, meta.get("config"))
    flat = {p: np.asarray(v) for p, v in flatten(restored["params"]).items()}
    source = f"{ref.output_dir} step {ref.step}"
    mode = meta.get("mode", cfg.TRAIN.MODE)
    if mode == "distill":
        _check_shapes(
            flat,
            _student_shapes(cfg),
            f"{source}: the student does not match the config ({cfg_source})",
            STUDENT_TABLE,
        )
        return Stage2Weights(cfg, unflatten(flat), {}, source, ref.step)
    tracker = _tracker_subset(
        flat, cfg, f"{source}: the fine-tuned modules do not match the config ({cfg_source})", TRACKER_TABLE
    )
    return Stage2Weights(cfg, None, tracker, source, ref.step)


def _tracker_subset(flat: Mapping[str, np.ndarray], cfg, what: str, table) -> dict:
    from es3_jax.models.tracker import expected_param_shapes

    modules = {p.split(".")[0] for p in flat}
    expected = {
        p: s for p, s in expected_param_shapes(cfg.MODEL.TEACHER).items() if p.split(".")[0] in modules
    }
    _check_shapes(flat, expected, what, table)
    return unflatten(dict(flat))


def _read_weights_folder(path: Path, config, overrides) -> Stage2Weights:
    from es3_jax import tracker_weights
    from porting.keymap import STUDENT_TABLE, TRACKER_TABLE

    params, folder_cfg = tracker_weights.load(path)
    if config is not None:
        cfg, cfg_source = config_lib.load(config, overrides), str(config)
    else:
        cfg, cfg_source = config_lib.apply_overrides(folder_cfg, overrides), str(path / "config.yaml")
    report = {}
    if (path / "port.json").is_file():
        report = json.loads((path / "port.json").read_text())
    mode = report.get("mode", cfg.TRAIN.MODE)
    student = params.pop("student", None)
    params.pop("trunk", None)
    if student is not None:
        _check_shapes(
            {p: np.asarray(v) for p, v in flatten(student).items()},
            _student_shapes(cfg),
            f"{path}: the student does not match the config ({cfg_source})",
            STUDENT_TABLE,
        )
    tracker = {}
    if mode == "finetune":
        # Only the modules the run trained: the others are the teacher it started from.
        trained = {
            p: np.asarray(v)
            for p, v in flatten(params).items()
            if p.split(".")[0] in cfg.TRAIN.FINETUNE_MODULES
        }
        tracker = _tracker_subset(
            trained,
            cfg,
            f"{path}: the fine-tuned modules do not match the config ({cfg_source})",
            TRACKER_TABLE,
        )
    if student is None and not tracker:
        raise ExportError(
            f"{path}: holds no student and no fine-tuned tracker modules (a plain teacher, e.g. `es3 port` "
            "output): nothing to export"
        )
    return Stage2Weights(cfg, student, tracker, str(path), report.get("step"))


# --- The record --------------------------------------------------------------------------------


def config_record(stage2: Stage2Weights, base: str = "") -> dict:
    """What the merged file records: the model sections of the config, whether its memory path is
    the student's, and where the parts came from."""
    model = config_lib.to_dict(stage2.cfg.MODEL)
    return {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "memory": "student" if stage2.student is not None else "teacher",
        "MODEL": {k: model[k] for k in RECORDED_SECTIONS},
        "source": {"stage2_weights": stage2.source, "step": stage2.step, "base": base},
    }


def record_config(record: Mapping, base: config_lib.Config | None = None) -> config_lib.Config:
    """The config a record describes (its MODEL sections over `base` or the defaults)."""
    if record.get("format") != RECORD_FORMAT:
        raise ExportError(f"not an es3 export record (format {record.get('format')!r})")
    model = {k: v for k, v in record.get("MODEL", {}).items() if k in RECORDED_SECTIONS}
    return config_lib.validate(config_lib.merge(base or config_lib.Config(), {"MODEL": model}))


# --- Reading and writing checkpoints as torch tensors (byte-exact) ------------------------------


def read_torch_checkpoint(path: str | Path) -> tuple[dict, dict | None]:
    """(the `model` state dict as torch tensors, the es3 record or None) of a `.pt`/`.pth` (flat or
    `{"model": ...}`) or `.safetensors` file. Tensors keep their dtype; nothing is converted."""
    from porting.sam3_checkpoint import CheckpointError, read_checkpoint

    try:
        sd, extras = read_checkpoint(path)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    record = extras.get(RECORD_KEY)
    return sd, json.loads(record) if isinstance(record, str) else record


def write_checkpoint(path: str | Path, sd: Mapping, record: Mapping, fmt: str) -> Path:
    """Write `{"model": sd, "es3_config": record}` (pt) or a safetensors file with the record in its
    metadata, through a temporary file in the same folder that is synced and renamed into place."""
    import torch

    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if fmt == "safetensors":
                from safetensors.torch import save

                bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
                if bad:
                    raise ExportError(
                        f"safetensors holds tensors only; the base has non-tensor entries: {bad[:5]}"
                    )
                # Views of one storage (e.g. from `mmap`) must be separate tensors in safetensors.
                f.write(
                    save(
                        {k: v.contiguous().clone() for k, v in sd.items()},
                        metadata={RECORD_KEY: json.dumps(record)},
                    )
                )
            else:
                torch.save({"model": dict(sd), RECORD_KEY: dict(record)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


# --- The merge ---------------------------------------------------------------------------------


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


def merge_state_dict(
    base: Mapping, stage2: Stage2Weights, source: str = "<base>"
) -> tuple[dict, MergeSummary]:
    """The merged `model` dict (torch tensors) and what changed; `base` is left untouched."""
    import torch

    from porting.keymap import TRACKER_TABLE
    from porting.torch_student import student_to_torch

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
    merged = {k: v for k, v in base.items() if not k.startswith(drop)} if drop else dict(base)
    removed = [k for k in base if drop and k.startswith(drop)]
    replaced = []
    problems = []
    for path, value in flatten(stage2.tracker).items():
        hit = TRACKER_TABLE.to_torch(path)
        if hit is None:
            problems.append(f"  no torch key for fine-tuned parameter {path}")
            continue
        key, transform = hit
        value = transform.to_torch(np.asarray(value))
        if key not in base:
            problems.append(f"  fine-tuned {path}: the base has no key {key}")
        elif tuple(base[key].shape) != value.shape:
            problems.append(
                f"  fine-tuned {path}: {key} is {tuple(base[key].shape)} in the base, {value.shape} here"
            )
        else:
            merged[key] = torch.from_numpy(np.ascontiguousarray(value)).to(base[key].dtype)
            replaced.append(key)
    if problems:
        raise ExportError("\n".join([f"{source}: the fine-tuned modules do not fit the base:", *problems]))
    added = []
    if stage2.student is not None:
        for key, value in student_to_torch(stage2.student).items():
            merged[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
            added.append(key)
    kept = len(base) - len(removed) - len(replaced)
    return merged, MergeSummary(kept, removed, added, replaced)


def es3_tracker_state_dict(folder: str | Path) -> dict:
    """An es3 weights folder's tracker (and tracker neck) in the sam3.pt layout, as a base to merge
    into when the teacher exists only in es3 (e.g. the demo's fine-tuned random teacher).

    `tracker.no_mem_pos_enc`, which upstream holds but never reads at inference, is written as zeros.
    """
    import torch

    from es3_jax import tracker_weights
    from porting.keymap import TRACKER_TABLE

    params, cfg = tracker_weights.load(folder)
    params.pop("student", None)
    params.pop("trunk", None)
    sd = {}
    for path, value in flatten(params).items():
        hit = TRACKER_TABLE.to_torch(path)
        if hit is None:
            raise ExportError(f"{folder}: no sam3.pt key for tracker parameter {path}")
        key, transform = hit
        sd[key] = torch.from_numpy(transform.to_torch(np.asarray(value, np.float32)))
    sd["tracker.no_mem_pos_enc"] = torch.zeros(1, 1, cfg.MODEL.TEACHER.D_MODEL)
    return sd


@dataclass
class ExportResult:
    path: Path
    format: str
    summary: MergeSummary
    record: dict


def export_merged(
    stage2_weights: str | Path | Stage2Weights,
    sam3_weights: str | Path,
    output_path: str | Path,
    *,
    fmt: str = "auto",
    overwrite: bool = False,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> ExportResult:
    """Merge a run's trained modules into a SAM3 / stage-1 checkpoint and write `output_path`.

    sam3_weights: a sam3.pt-layout file, or an es3 weights folder holding the teacher (its tracker
    and neck become the base). fmt: "pt", "safetensors" or "auto" (from the output's suffix). An
    existing output is replaced only with `overwrite`; the base is never written to.
    """
    output_path = Path(output_path)
    if fmt == "auto":
        fmt = "safetensors" if output_path.suffix == ".safetensors" else "pt"
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if output_path.exists() and output_path.resolve() == Path(sam3_weights).resolve():
        raise ExportError(f"--output_path {output_path} is the base checkpoint; write the merge elsewhere")
    if output_path.exists() and not overwrite:
        raise ExportError(f"{output_path} already exists; choose another --output_path or pass --overwrite")
    stage2 = (
        stage2_weights
        if isinstance(stage2_weights, Stage2Weights)
        else read_stage2(stage2_weights, config=config, overrides=overrides)
    )
    if Path(sam3_weights).is_dir():
        base = es3_tracker_state_dict(sam3_weights)
    else:
        base, _ = read_torch_checkpoint(sam3_weights)
    merged, summary = merge_state_dict(base, stage2, str(sam3_weights))
    record = config_record(stage2, str(sam3_weights))
    path = write_checkpoint(output_path, merged, record, fmt)
    return ExportResult(path, fmt, summary, record)


# --- Back into es3 -------------------------------------------------------------------------------


def is_merged(sd: Mapping, record: Mapping | None) -> bool:
    """Whether a checkpoint is an es3 merged export (or carries a student some other way)."""
    return record is not None or any(k.startswith(PERCEIVER_PREFIX) for k in sd)


def is_merged_file(path: str | Path) -> bool:
    """Whether `path` is a merged export (an es3 record, or perceiver keys); False for anything
    unreadable, which the ordinary port then reports."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                return RECORD_KEY in meta or any(k.startswith(PERCEIVER_PREFIX) for k in f.keys())  # noqa: SIM118
        sd, record = read_torch_checkpoint(path)
    except ExportError:
        return False
    return is_merged(sd, record)


def port_merged(
    path: str | Path, base_cfg: config_lib.Config | None = None
) -> tuple[dict, config_lib.Config, dict]:
    """A merged export -> (es3 params: the tracker without its memory attention plus "student",
    the config its record describes over `base_cfg`, a port report).

    Strict: the student's keys must fit the recorded student exactly and every other tracker key
    the tracker es3 expects. A file without a record needs `base_cfg` to describe its student.
    """
    import torch

    from es3_jax.models.tracker import expected_param_shapes
    from porting.keymap import STUDENT_TABLE
    from porting.sam3_checkpoint import _to_numpy, port_state_dict
    from porting.torch_student import student_from_torch

    sd, record = read_torch_checkpoint(path)
    if record is not None:
        cfg = record_config(record, base_cfg)
        memory = record.get("memory", "student")
    elif base_cfg is not None:
        cfg, memory = base_cfg, "student"
    else:
        raise ExportError(f"{path}: no {RECORD_KEY} record: pass the config that describes its student")
    numpy_sd = {k: _to_numpy(v) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    expected = expected_param_shapes(cfg.MODEL.TEACHER)
    if memory == "teacher":
        result = port_state_dict(numpy_sd, expected=expected, source=str(path))
        return result.params, cfg, {**result.summary(), "memory": "teacher"}
    student_sd = {k: v for k, v in numpy_sd.items() if k.startswith(STUDENT_PREFIXES)}
    rest = {k: v for k, v in numpy_sd.items() if not k.startswith(STUDENT_PREFIXES)}
    try:
        student = student_from_torch(student_sd)
    except KeyError as e:
        raise ExportError(f"{path}: unexpected key {e.args[0]}") from e
    _check_shapes(
        flatten(student),
        _student_shapes(cfg),
        f"{path}: the student keys do not match its recorded config",
        STUDENT_TABLE,
    )
    tracker_expected = {p: s for p, s in expected.items() if not p.startswith("memory_attention.")}
    result = port_state_dict(rest, expected=tracker_expected, source=str(path))
    summary = {**result.summary(), "memory": "student", "student_keys": len(student_sd), "record": record}
    return {**result.params, "student": student}, cfg, summary
