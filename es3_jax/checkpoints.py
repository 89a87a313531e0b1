"""The checkpoints of a training run: orbax under `<output_dir>/checkpoints/<step>/`, written by the
trainer and read back by `--resume` and by `es3_jax.weights.load` (a run's student or fine-tuned
modules).

Each checkpoint holds the trainable parameters (`params`), the optimiser state (`opt_state`), the
data-iterator state (`data`) and `meta` (step, resolved config, counters). Kept: the latest
`TRAIN.KEEP_LATEST`, every `TRAIN.SAVE_EVERY`-th step, and the best by the validation metric.
Orbax writes each step to a temporary folder and renames it when complete, so a killed process
never leaves a checkpoint that reads as whole. The frozen teacher is not saved: it is reloaded
from its own weights.

Names users pass to `--resume`:
`<output_dir>` or `<output_dir>/ckpt_latest` (the newest step), `<output_dir>/ckpt_best`,
`<output_dir>/ckpt_step_<N>` or `<output_dir>/checkpoints/<N>`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from es3_jax.errors import Es3Error
from es3_jax.params import flatten, unflatten

CHECKPOINTS = "checkpoints"
BEST_METRIC = "val_jf"


class CheckpointNotFoundError(Es3Error):
    """A checkpoint name that resolves to nothing; the message lists what exists."""


def manager(
    output_dir: str | Path, *, keep_latest: int = 3, save_every: int = 0, read_only: bool = False
) -> ocp.CheckpointManager:
    """The CheckpointManager of a run (created on first save)."""
    keep = [policies.LatestN(keep_latest)]
    if save_every > 0:
        keep.append(policies.EveryNSteps(save_every))
    keep.append(
        policies.BestN(
            get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1, keep_checkpoints_without_metrics=False
        )
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep),
        best_fn=lambda m: m[BEST_METRIC],
        best_mode="max",
        enable_async_checkpointing=False,
        read_only=read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(
        Path(output_dir).absolute() / CHECKPOINTS,
        item_names=("params", "opt_state", "data", "meta"),
        options=options,
    )


def save(
    mgr: ocp.CheckpointManager,
    step: int,
    *,
    params: Any,
    opt_state: Any,
    data_state: Mapping,
    meta: Mapping,
    metrics: Mapping[str, float] | None = None,
) -> None:
    """Write one checkpoint and wait until it is complete on disk."""
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        data=ocp.args.JsonSave(dict(data_state)),
        meta=ocp.args.JsonSave(dict(meta)),
    )
    mgr.save(step, args=args, metrics=dict(metrics) if metrics else None, force=True)
    mgr.wait_until_finished()


def _abstract(tree: Any) -> Any:
    """Target of a restore: shapes, dtypes and shardings of `tree` (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


def restore(mgr: ocp.CheckpointManager, step: int, *, params: Any, opt_state: Any | None = None) -> dict:
    """Read step `step` onto the shardings of the given templates (the current mesh, whatever mesh saved it).

    `params` / `opt_state`: trees of arrays or ShapeDtypeStructs with the target shardings;
    `opt_state=None` reads only the parameters (export, evaluation). Returns a dict with
    `params`, `opt_state` (or None), `data` and `meta`.
    """
    items = {
        "params": ocp.args.StandardRestore(_abstract(params)),
        "data": ocp.args.JsonRestore(),
        "meta": ocp.args.JsonRestore(),
    }
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state))
    out = mgr.restore(step, args=ocp.args.Composite(**items))
    return {
        "params": out["params"],
        "opt_state": out["opt_state"] if opt_state is not None else None,
        "data": out["data"],
        "meta": out["meta"],
    }


@dataclass(frozen=True)
class CheckpointRef:
    """A resolved checkpoint: the run's output folder and the step."""

    output_dir: Path
    step: int


def is_reference(path: str | Path) -> bool:
    """Whether `path` names a checkpoint by one of the forms `resolve` accepts other than a run folder."""
    path = Path(path)
    return (
        path.name in ("ckpt_latest", "ckpt_best", CHECKPOINTS)
        or re.fullmatch(r"ckpt_step_\d+", path.name) is not None
        or (path.name.isdigit() and path.parent.name == CHECKPOINTS)
    )


def read(ref: CheckpointRef) -> tuple[dict, dict]:
    """(trainable parameters as saved, meta) of a resolved checkpoint, without a template."""
    mgr = manager(ref.output_dir, read_only=True)
    out = mgr.restore(
        ref.step, args=ocp.args.Composite(params=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    )
    params = unflatten({k: np.asarray(v) for k, v in flatten(out["params"]).items()})
    return params, out["meta"]


def resolve(name: str | Path) -> CheckpointRef:
    """A user's checkpoint name -> (output_dir, step); see the module docstring for accepted forms."""
    path = Path(name)
    which = "latest"
    step: int | None = None
    if path.name in ("ckpt_latest", "ckpt_best"):
        which, path = path.name.removeprefix("ckpt_"), path.parent
    elif m := re.fullmatch(r"ckpt_step_(\d+)", path.name):
        step, path = int(m.group(1)), path.parent
    elif path.name.isdigit() and path.parent.name == CHECKPOINTS:
        step, path = int(path.name), path.parent.parent
    elif path.name == CHECKPOINTS:
        path = path.parent
    if not (path / CHECKPOINTS).is_dir():
        raise CheckpointNotFoundError(f"{name}: no {CHECKPOINTS}/ folder under {path}")
    mgr = manager(path, read_only=True)
    steps = sorted(mgr.all_steps())
    if not steps:
        raise CheckpointNotFoundError(f"{name}: {path / CHECKPOINTS} holds no complete checkpoint")
    if step is None:
        step = mgr.best_step() if which == "best" else mgr.latest_step()
        if step is None:
            raise CheckpointNotFoundError(f"{name}: no checkpoint has a validation metric; steps: {steps}")
    elif step not in steps:
        raise CheckpointNotFoundError(f"{name}: step {step} is not among the saved steps {steps}")
    return CheckpointRef(path, step)
