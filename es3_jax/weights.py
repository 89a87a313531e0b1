"""Every way weights come in, in one place: `load(source)` reads a source once and says what it holds.

Sources (`load`'s first argument):

| source | kind | holds |
|---|---|---|
| None or "" | `random` | a tracker drawn from `seed` |
| an es3 weights folder (`params/` + `config.yaml`: `es3 port`, `<run>/weights`) | `weights_folder` | tracker, student, trunk: whatever was saved |
| a run folder (`es3 train --output_dir`) | as its `weights/`, else its latest checkpoint | |
| `<run>/ckpt_latest`, `ckpt_best`, `ckpt_step_<N>`, `<run>/checkpoints/<N>` (a seed-style `.pth` suffix is ignored) | `checkpoint` | the student (distillation) or the fine-tuned modules, over the run's teacher |
| Meta's `sam3.pt` | `sam3` | tracker, SAM3 ViT trunk |
| a stage-1 merged `.pt` (EfficientSAM3's RepViT, TinyViT or EfficientViT trunk) | `stage1` | tracker, stage-1 trunk (`MODEL.TRUNK.KIND` set from it) |
| a transformers `Sam3TrackerVideoModel` `.safetensors` file or folder | `transformers` | tracker, trunk |
| a merged export (`es3 export`, `save_efficient_sam3`) | `merged_export` | tracker (without a memory attention when its memory path is the student's), student, trunk |

PyTorch files are read through `porting/` (the only place that imports torch), each file once and
told apart once (`porting.checkpoint_contents`); the state dict as read stays in
`Weights.state_dict`, so that `es3 export` merges into exactly those tensors. Everything is
checked strictly: a missing, unexpected or mis-shaped parameter is one `ParamMismatchError` naming
them all.

The config of the result (`Weights.cfg`): the `config` given (a Config, a YAML path, or None for
the defaults), with these exceptions: a weights folder, run or checkpoint brings its own config
when none is given; a merged export's record describes its model over the config given. The
`overrides` (`KEY VALUE` pairs) apply last.

A weights folder (`save`):

    <dir>/params/        orbax checkpoint of the nested parameter dict: the tracker's modules, and
                         `student` / `trunk` when there are ones (list indices as "0", "1", ...)
    <dir>/config.yaml    the resolved es3 config (MODEL.TEACHER describes the tracker geometry)
    <dir>/port.json      where the weights came from (and, for `es3 train`, the mode and step)
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from es3_jax import checkpoints
from es3_jax import config as config_lib
from es3_jax.errors import require_torch
from es3_jax.loaded_weights import Weights, WeightsError
from es3_jax.models.student import student_from_config
from es3_jax.models.tracker import SAM3Tracker, expected_param_shapes
from es3_jax.models.trunk import trunk_from_config
from es3_jax.outputs import check_writable, staged_folder
from es3_jax.params import abstract_shapes, check_shapes, flatten, param_dict, unflatten
from porting.keymap import STUDENT_TABLE, TRACKER_TABLE

PARAMS_DIR = "params"
CONFIG_FILE = "config.yaml"
REPORT_FILE = "port.json"
STUDENT = "student"
TRUNK = "trunk"
PARTS = ("tracker", STUDENT, TRUNK)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _config(config: config_lib.Config | str | Path | None, overrides: Sequence[str]) -> config_lib.Config:
    if isinstance(config, config_lib.Config):
        return config_lib.apply_overrides(config, overrides)
    return config_lib.load(config, overrides)


def load(
    source: str | Path | None,
    config: config_lib.Config | str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    seed: int = 0,
    parts: Collection[str] = PARTS,
) -> Weights:
    """Read a weights source once -> `Weights` (see the module docstring).

    parts: which of "tracker", "student", "trunk" the caller needs; the others may be left out
    where reading them costs (the trunk of a PyTorch file, a checkpoint's teacher).
    """
    if source is None or str(source) == "":
        cfg = _config(config, overrides)
        tracker = (
            param_dict(SAM3Tracker(cfg.MODEL.TEACHER, rngs=nnx.Rngs(seed))) if "tracker" in parts else None
        )
        return Weights(cfg, f"random (seed {seed})", "random", tracker=tracker)
    path = Path(source)
    if path.suffix == ".pth" and not path.exists():
        path = path.with_suffix("")  # the seed names checkpoints `ckpt_best.pth`
    if checkpoints.is_reference(path):
        return _load_checkpoint(path, config, overrides, parts)
    if not path.exists():
        raise WeightsError(f"checkpoint not found: {path}")
    if path.is_dir():
        if (path / PARAMS_DIR).is_dir() and (path / CONFIG_FILE).is_file():
            return _load_folder(path, config, overrides)
        if (path / "weights" / PARAMS_DIR).is_dir():
            return _load_folder(path / "weights", config, overrides)
        if (path / checkpoints.CHECKPOINTS).is_dir():
            return _load_checkpoint(path, config, overrides, parts)
        if any(path.glob("*.safetensors")):
            return _load_torch(path, config, overrides, parts)
        raise WeightsError(
            f"{path}: not a weights source (an es3 weights folder, an `es3 train` run or checkpoint, or a "
            "folder of .safetensors files)"
        )
    if path.suffix in TORCH_SUFFIXES:
        return _load_torch(path, config, overrides, parts)
    raise WeightsError(f"{path}: unknown weights file (expected {', '.join(TORCH_SUFFIXES)} or a folder)")


def teacher(cfg: config_lib.Config, *, trunk: bool) -> Weights:
    """The tracker `MODEL.TEACHER_WEIGHTS` names, under `cfg` (random from `TRAIN.SEED` when empty),
    checked fit to be the frozen teacher or the tracker to fine-tune. trunk: the run computes
    features from frames (`DATA.USE_PRECOMPUTED False`)."""
    parts = ("tracker", TRUNK) if trunk else ("tracker",)
    weights = load(cfg.MODEL.TEACHER_WEIGHTS or None, cfg, seed=cfg.TRAIN.SEED, parts=parts)
    weights.require_teacher()
    return weights


# --- es3 weights folders -------------------------------------------------------------------------


def _string_keys(tree: Mapping) -> dict:
    return {str(k): _string_keys(v) if isinstance(v, Mapping) else np.asarray(v) for k, v in tree.items()}


def check_output(output_dir: str | Path) -> Path:
    """WeightsError (or OutputError) unless `save` could write `output_dir` now: absent or empty,
    in a folder that can be written. -> the absolute path."""
    output_dir = Path(output_dir).absolute()
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise WeightsError(f"{output_dir} already exists and is not empty; choose another --output_dir")
    check_writable(output_dir)
    return output_dir


def save(output_dir: str | Path, weights: Weights) -> Path:
    """Write `weights` (tracker, student and trunk, those it has) as an es3 weights folder. The
    folder appears complete or not at all (`es3_jax.outputs.staged_folder`: an OutputError names a
    failed write). In a multi-process run one process calls it."""
    output_dir = check_output(output_dir)
    params = dict(weights.tracker or {})
    for name, part in ((STUDENT, weights.student), (TRUNK, weights.trunk)):
        if part is not None:
            params[name] = part
    report = {
        **weights.report,
        "source": weights.source,
        "step": weights.step,
        "trained": sorted(weights.trained),
    }
    with staged_folder(output_dir, holds=(PARAMS_DIR, CONFIG_FILE, REPORT_FILE)) as staging:
        # One process writes the folder: orbax must not wait at barriers for processes that never
        # call this.
        me = jax.process_index()
        options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        # Closed on failure too: else its abandoned writes report on a closed event loop at exit.
        with checkpoints.quiet_orbax(), ocp.StandardCheckpointer(multiprocessing_options=options) as checkpointer:
            checkpointer.save(staging / PARAMS_DIR, _string_keys(params))
            checkpointer.wait_until_finished()
        config_lib.save(weights.cfg, staging / CONFIG_FILE)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return output_dir


def _load_folder(folder: Path, config, overrides: Sequence[str]) -> Weights:
    folder = folder.absolute()
    cfg = _config(folder / CONFIG_FILE if config is None else config, overrides)
    try:
        restored = ocp.StandardCheckpointer().restore(folder / PARAMS_DIR)
    except Exception as e:
        raise WeightsError(f"{folder / PARAMS_DIR}: unreadable orbax checkpoint: {e}") from e
    params = unflatten({k: np.asarray(v) for k, v in flatten(restored).items()})
    report = json.loads((folder / REPORT_FILE).read_text()) if (folder / REPORT_FILE).is_file() else {}
    student = params.pop(STUDENT, None)
    trunk = params.pop(TRUNK, None)
    source = str(folder)
    if student is not None:
        _check_student(student, cfg, f"{source}: the student does not match its config")
    # Folders written before the report listed the trained modules say only the run's mode.
    names = report.get("trained", cfg.TRAIN.FINETUNE_MODULES if report.get("mode") == "finetune" else ())
    trained = {k: params[k] for k in names if k in params}
    return Weights(
        cfg,
        source,
        "weights_folder",
        tracker=params or None,
        student=student,
        trunk=trunk,
        trained=trained,
        step=report.get("step"),
        report=report,
    )


# --- training checkpoints ----------------------------------------------------------------------


def _load_checkpoint(path: Path, config, overrides: Sequence[str], parts: Collection[str]) -> Weights:
    try:
        ref = checkpoints.resolve(path)
    except checkpoints.CheckpointNotFoundError as e:
        raise WeightsError(str(e)) from e
    # A damaged newest step gives way to the next older (with a warning); a named one is an error.
    step, params, meta = checkpoints.read(ref)
    run_config = ref.output_dir / CONFIG_FILE
    if config is not None:
        cfg = _config(config, overrides)
    elif run_config.is_file():
        cfg = config_lib.load(run_config, overrides)
    elif meta.get("config") is not None:
        cfg = config_lib.validate(
            config_lib.apply_overrides(config_lib.merge(config_lib.Config(), meta["config"]), overrides)
        )
    else:
        raise WeightsError(f"{ref.output_dir}: no {CONFIG_FILE} to describe the checkpoint (pass a config)")
    source = f"{ref.output_dir} step {step}"
    student, trained = None, {}
    if meta.get("mode", cfg.TRAIN.MODE) == "distill":
        student = params
        _check_student(student, cfg, f"{source}: the student does not match the config")
    else:
        trained = params
        expected = expected_param_shapes(cfg.MODEL.TEACHER)
        check_shapes(
            {p: np.shape(v) for p, v in flatten(trained).items()},
            {p: s for p, s in expected.items() if p.split(".")[0] in trained},
            f"{source}: the fine-tuned modules do not match the config",
            _torch_name(TRACKER_TABLE),
        )
    weights = Weights(cfg, source, "checkpoint", student=student, trained=trained, step=step)
    if "tracker" in parts or TRUNK in parts:
        # The tracker it ran with: the run's teacher, with what the run fine-tuned in place.
        base = load(
            cfg.MODEL.TEACHER_WEIGHTS or None,
            cfg,
            seed=cfg.TRAIN.SEED,
            parts=[p for p in parts if p != STUDENT],
        )
        weights.tracker = None if base.tracker is None else {**base.tracker, **trained}
        weights.trunk = base.trunk
        weights.report = {"teacher": base.source}
    return weights


# --- PyTorch files --------------------------------------------------------------------------------


def _load_torch(path: Path, config, overrides: Sequence[str], parts: Collection[str]) -> Weights:
    require_torch(f"{path}: reading a PyTorch checkpoint", WeightsError)
    # Imported here, not at the top: porting imports torch, which es3 needs only for PyTorch files.
    from porting import checkpoint_contents as contents_lib
    from porting import checkpoint_file
    from porting import sam3_checkpoint as port
    from porting import stage1_checkpoint as stage1

    source = str(path)
    contents = contents_lib.read_contents(path)
    if not any(k.startswith("tracker.") for k in contents.tracker):
        raise WeightsError(
            f"{path}: holds no SAM3 tracker (no tracker.* keys): a detector-only checkpoint? es3 needs "
            "Meta's sam3.pt, a stage-1 merged checkpoint, a transformers Sam3TrackerVideoModel or an es3 export"
        )
    merged = contents.kind == "merged_export"
    base = _config(config, ()) if config is not None else config_lib.Config()
    if contents.record is not None:
        cfg = config_lib.apply_overrides(checkpoint_file.record_config(contents.record, base), overrides)
    elif merged and config is None:
        raise WeightsError(
            f"{path}: a merged export without its es3_config record: pass the config of its student"
        )
    else:
        cfg = config_lib.validate(config_lib.apply_overrides(base, overrides))
    expected = expected_param_shapes(cfg.MODEL.TEACHER)
    student = None
    if contents.memory == STUDENT:
        student = port.port_student(contents.student, _student_shapes(cfg), source)
        expected = {p: s for p, s in expected.items() if not p.startswith("memory_attention.")}
    result = port.port_state_dict(contents.tracker, table=TRACKER_TABLE, expected=expected, source=source)
    trunk_kind = contents.trunk_kind
    trunk, trunk_ported = None, False
    if trunk_kind in config_lib.STAGE1_TRUNK_KINDS:
        # The checkpoint says which student trunk it holds; the config follows it.
        named = cfg.MODEL.TRUNK.KIND
        if named not in (config_lib.SAM3_VIT, trunk_kind):
            raise WeightsError(
                f"{path}: the checkpoint's trunk is {trunk_kind}, but MODEL.TRUNK.KIND is {named}; leave "
                f"MODEL.TRUNK.KIND at {config_lib.SAM3_VIT} to take the checkpoint's, or give a checkpoint "
                "of that trunk"
            )
        # Ported (so checked) even where the caller needs no trunk: the file must be whole.
        ported = stage1.port_stage1_trunk(
            contents.trunk, trunk_kind, out_dim=cfg.MODEL.TEACHER.TRUNK_DIM, source=source
        )
        cfg = config_lib.apply_overrides(cfg, ["MODEL.TRUNK.KIND", trunk_kind])
        trunk, trunk_ported = (ported if TRUNK in parts else None), True
    elif trunk_kind == config_lib.SAM3_VIT and cfg.MODEL.TRUNK.KIND != config_lib.SAM3_VIT:
        raise WeightsError(
            f"{path}: holds SAM3's ViT trunk, but MODEL.TRUNK.KIND is {cfg.MODEL.TRUNK.KIND}; set it to "
            f"{config_lib.SAM3_VIT} or give a stage-1 checkpoint of that trunk"
        )
    elif trunk_kind == config_lib.SAM3_VIT and TRUNK in parts:
        expected_trunk = abstract_shapes(lambda: trunk_from_config(cfg))
        trunk, trunk_ported = port.port_trunk(contents.trunk, expected=expected_trunk, source=source), True
    report = {
        "layout": contents.layout,
        "trunk": trunk_kind,
        "memory": contents.memory,
        "consumed_keys": result.consumed,
        "ignored_keys": result.ignored,
        "unused_keys": contents.unused_keys(trunk_ported),
        "text": contents_lib.format_report(contents, result, trunk_ported),
    }
    return Weights(
        cfg,
        source,
        contents.kind,
        tracker=result.params,
        student=student,
        trunk=trunk,
        report=report,
        state_dict=contents.state_dict,
    )


# --- checks ----------------------------------------------------------------------------------------


def _torch_name(table) -> Any:
    def describe(path: str) -> str:
        hit = table.to_torch(path)
        return f"{path} ({hit[0]})" if hit else path

    return describe


def _student_shapes(cfg: config_lib.Config) -> dict[str, tuple[int, ...]]:
    return abstract_shapes(lambda: student_from_config(cfg, seed=0))


def _check_student(student: Mapping, cfg: config_lib.Config, what: str) -> None:
    """The student's parameters must be exactly those its config describes."""
    check_shapes(
        {p: np.shape(v) for p, v in flatten(student).items()},
        _student_shapes(cfg),
        what,
        _torch_name(STUDENT_TABLE),
    )
