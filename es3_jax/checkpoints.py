"""The checkpoints of a training run: orbax under `<output_dir>/checkpoints/<step>/`, written by the
trainer and read back by `--resume` and by `es3_jax.weights.load` (a run's student or fine-tuned
modules).

Each checkpoint holds the trainable parameters (`params`), the optimiser state (`opt_state`), the
data-iterator state (`data`) and `meta` (step, resolved config, counters). Kept: the latest
`TRAIN.KEEP_LATEST`, every `TRAIN.SAVE_EVERY`-th step, and the best by the validation metric.
Orbax writes each step to a temporary folder and renames it when complete, so a killed process
never leaves a checkpoint that reads as whole. The frozen teacher is not saved: it is reloaded
from its own weights.

Orbax checks no data on reading (a flipped byte in a data file reads back as another value), so
each checkpoint also holds `checksums`: one 64-bit checksum per saved array of `params` and
`opt_state`, verified on every read. A checksum is a sum over the array's elements of a hash of
(position, bits): each process adds up the shards it holds, whatever the mesh, so a checkpoint
saved on one mesh verifies on another. A checkpoint that cannot be read or does not match is
damaged (`CheckpointDamagedError`, naming the step folder and the array or the failing read).
Checkpoints written before checksums existed are read unverified.

Names users pass to `--resume`:
`<output_dir>` or `<output_dir>/ckpt_latest` (the newest step), `<output_dir>/ckpt_best`,
`<output_dir>/ckpt_step_<N>` or `<output_dir>/checkpoints/<N>`. A name for the newest step falls
back to the next older step when the newest is damaged (the caller reports each one skipped);
a named step or the best one does not.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from es3_jax.errors import Es3Error
from es3_jax.outputs import system_error
from es3_jax.params import check_shapes, flatten, unflatten

CHECKPOINTS = "checkpoints"
CHECKSUMS = "checksums"
ARRAY_ITEMS = ("params", "opt_state")
BEST_METRIC = "val_jf"
# OS errors that mean the file system will not take a checkpoint: full, over quota, file too
# large, read-only, not permitted.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)

T = TypeVar("T")


class CheckpointNotFoundError(Es3Error):
    """A checkpoint name that resolves to nothing; the message lists what exists."""


class CheckpointDamagedError(Es3Error):
    """A checkpoint that cannot be read back as written: a file missing or cut, or an array whose
    checksum does not match; the message names the step folder and what failed."""


class CheckpointWriteError(Es3Error):
    """The file system refused a checkpoint (full, over quota, read-only); the message names the
    folder and the OS reason. Nothing of the refused step is left; earlier steps are intact."""


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
        item_names=(*ARRAY_ITEMS, "data", "meta", CHECKSUMS),
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
    """Write one checkpoint, with the shapes and checksums of its arrays, and wait until it is
    complete on disk.

    Every process calls it (the checksums of sharded arrays are summed across processes). A file
    system that refuses the write raises `CheckpointWriteError` after removing what was written of
    this step."""
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        data=ocp.args.JsonSave(dict(data_state)),
        meta=ocp.args.JsonSave(dict(meta)),
        checksums=ocp.args.JsonSave({"params": _record(params), "opt_state": _record(opt_state)}),
    )
    try:
        with quiet_orbax():
            mgr.save(step, args=args, metrics=dict(metrics) if metrics else None, force=True)
            mgr.wait_until_finished()
    except Exception as e:
        refused = write_error(e)
        if refused is None:
            raise
        folder = Path(mgr.directory)
        if jax.process_index() == 0:
            # Orbax writes under `<step>.orbax-checkpoint-tmp*`; a step never appears half-written,
            # but the part written holds space the next save needs.
            for partial in folder.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointWriteError(
            f"{folder}: cannot write the checkpoint of step {step}: {refused} (the earlier "
            "checkpoints are intact)"
        ) from e


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
    """Orbax's background threads log a failed write at ERROR level, with its traceback, before the
    save raises it: the raised error is what reaches the user (named, or with its own traceback)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def write_error(error: BaseException) -> str | None:
    """The OS reason (`"No space left on device [ENOSPC]"`) when `error`, or what caused it, is the
    file system refusing a write (`WRITE_ERRNOS`), else None."""
    failure = system_error(error)
    if failure is None or failure.errno not in WRITE_ERRNOS:
        return None
    return f"{os.strerror(failure.errno)} [{errno.errorcode[failure.errno]}]"


# Constants of the element hash (splitmix64's): any change of one element changes the sum.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _block_sum(block: np.ndarray, index: tuple, shape: tuple[int, ...]) -> int:
    """Sum (mod 2^64) over the elements of `block`, the part `index` (slices) of an array of `shape`,
    of a hash of (flat position in the array, bits). Blocks that tile the array sum to the same
    value however it is cut."""
    block = np.ascontiguousarray(block)
    bits = block.view(f"u{block.dtype.itemsize}").astype(np.uint64).reshape(-1)
    position = np.zeros((), np.uint64)
    stride = 1
    for axis in reversed(range(len(shape))):
        start = (index[axis].start or 0) if axis < len(index) else 0
        offsets = (np.arange(block.shape[axis], dtype=np.uint64) + np.uint64(start)) * np.uint64(stride)
        position = np.add.outer(offsets, position)
        stride *= shape[axis]
    h = bits + position.reshape(-1) * _GOLDEN
    h = (h ^ (h >> np.uint64(30))) * _MIX1
    h = (h ^ (h >> np.uint64(27))) * _MIX2
    h ^= h >> np.uint64(31)
    return int(h.sum(dtype=np.uint64))


def _leaf_name(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def checksums(tree: Any) -> dict[str, str]:
    """`{dotted path: 16 hex digits}`, one checksum per array of `tree` (numpy or jax arrays),
    independent of how the arrays are sharded. A jax array sharded across processes is summed over
    the shards each process holds (replica 0 of each), then across processes: every process must
    call it, and every process gets the same result."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums, spread = [], []
    for _, leaf in leaves:
        if isinstance(leaf, jax.Array):
            blocks = [(np.asarray(s.data), s.index) for s in leaf.addressable_shards if s.replica_id == 0]
            spread.append(not leaf.is_fully_addressable)
        else:
            blocks = [(np.asarray(leaf), ())]
            spread.append(False)
        sums.append(sum(_block_sum(b, i, np.shape(leaf)) for b, i in blocks) % 2**64)
    if any(spread):
        # Two 32-bit halves: JAX moves no 64-bit integers unless x64 is on.
        local = np.array([[s >> 32, s & 0xFFFFFFFF] for s in sums], np.uint32).reshape(-1, 2)
        everyone = np.asarray(multihost_utils.process_allgather(local)).astype(np.uint64)
        totals = (everyone[..., 0].astype(object) << 32) + everyone[..., 1].astype(object)
        sums = [int(totals[:, i].sum()) % 2**64 if s else sums[i] for i, s in enumerate(spread)]
    return {_leaf_name(path): f"{s:016x}" for (path, _), s in zip(leaves, sums, strict=True)}


def _record(tree: Any) -> dict[str, dict]:
    """What a checkpoint records of a tree of arrays: `{dotted path: {"shape", "checksum"}}`."""
    shapes = _shapes(tree)
    return {k: {"shape": shapes[k], "checksum": v} for k, v in checksums(tree).items()}


def _shapes(tree: Any) -> dict[str, list[int]]:
    return {_leaf_name(p): list(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _reason(error: BaseException) -> str:
    """What went wrong in a failed read, in one line: the innermost cause's first line."""
    while error.__cause__ is not None:
        error = error.__cause__
    line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {line[:300]}"


def _restore_agreed(mgr: ocp.CheckpointManager, step: int, items: Mapping[str, Any]) -> dict:
    """`mgr.restore` of `items`, every process agreeing: unreadable for one is damaged for all."""
    problem = None
    try:
        out = dict(mgr.restore(step, args=ocp.args.Composite(**items)))
    except Exception as e:  # orbax and tensorstore raise many types for a missing or cut file
        problem = f"unreadable ({_reason(e)})"
    everywhere = problem is None
    if jax.process_count() > 1:
        flags = multihost_utils.process_allgather(np.array([everywhere], np.int32))
        everywhere = bool(np.all(np.asarray(flags)))
    if not everywhere:
        raise CheckpointDamagedError(
            f"{Path(mgr.directory) / str(step)}: {problem or 'unreadable on another process'}"
        )
    return out


def _read(
    mgr: ocp.CheckpointManager,
    step: int,
    items: Mapping[str, Any],
    templates: Mapping[str, Any] | None = None,
) -> dict:
    """Restore `items` of step `step` and check its arrays -> the restored items. templates: the
    trees the array items are read onto, whose names and shapes must be the saved ones (else a
    `ParamMismatchError`: a config that is not the checkpoint's, not damage). Every process calls it."""
    folder = Path(mgr.directory) / str(step)
    record = None
    if (folder / CHECKSUMS).is_dir():  # older checkpoints carry none
        record = _restore_agreed(mgr, step, {CHECKSUMS: ocp.args.JsonRestore()})[CHECKSUMS]
        for item, template in (templates or {}).items():
            check_shapes(
                {k: v["shape"] for k, v in record[item].items()},
                _shapes(template),
                f"{folder}: the checkpoint's {item} do not fit this run's (a different config?)",
            )
    out = _restore_agreed(mgr, step, items)
    for item in (i for i in ARRAY_ITEMS if i in items and record is not None):
        found = checksums(out[item])
        wrong = sorted(k for k, v in record[item].items() if found.get(k) != v["checksum"])
        if wrong:
            shown = ", ".join(wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
            raise CheckpointDamagedError(
                f"{folder}: {item} {shown} {'does' if len(wrong) == 1 else 'do'} not match the "
                f"checksum written with {'it' if len(wrong) == 1 else 'them'} (files under "
                f"{folder / item} changed after the save)"
            )
    return out


def _abstract(tree: Any) -> Any:
    """Target of a restore: shapes, dtypes and shardings of `tree` (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


def restore(mgr: ocp.CheckpointManager, step: int, *, params: Any, opt_state: Any | None = None) -> dict:
    """Read step `step` onto the shardings of the given templates (the current mesh, whatever mesh saved it).

    `params` / `opt_state`: trees of arrays or ShapeDtypeStructs with the target shardings;
    `opt_state=None` reads only the parameters (export, evaluation). Returns a dict with
    `params`, `opt_state` (or None), `data` and `meta`. A damaged step raises
    `CheckpointDamagedError`; templates that are not the saved trees, `ParamMismatchError`.
    """
    items = {
        "params": ocp.args.StandardRestore(_abstract(params)),
        "data": ocp.args.JsonRestore(),
        "meta": ocp.args.JsonRestore(),
    }
    templates = {"params": params}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state))
        templates["opt_state"] = opt_state
    out = _read(mgr, step, items, templates)
    return {
        "params": out["params"],
        "opt_state": out["opt_state"] if opt_state is not None else None,
        "data": out["data"],
        "meta": out["meta"],
    }


@dataclass(frozen=True)
class CheckpointRef:
    """A resolved checkpoint: the run's output folder and the step; `fallbacks`, newest first, are
    the older steps to read instead when the name asked for the newest and `step` is damaged."""

    output_dir: Path
    step: int
    fallbacks: tuple[int, ...] = ()


def first_good(ref: CheckpointRef, load: Callable[[int], T]) -> tuple[int, T, list[str]]:
    """`load` the step `ref` names, or the first of its fallbacks that is not damaged ->
    (step, what `load` returned, why each newer step was skipped). None good: a
    `CheckpointDamagedError` naming the checkpoints folder and each step's damage."""
    skipped: list[str] = []
    for step in (ref.step, *ref.fallbacks):
        try:
            return step, load(step), skipped
        except CheckpointDamagedError as e:
            skipped.append(str(e))
    if not ref.fallbacks:
        raise CheckpointDamagedError(skipped[0])
    raise CheckpointDamagedError(
        f"{ref.output_dir / CHECKPOINTS}: no readable checkpoint:\n  " + "\n  ".join(skipped)
    )


def resume_ref(resume: str, output_dir: str | Path) -> CheckpointRef | None:
    """The checkpoint `es3 train --resume <resume>` continues from: a name `resolve` accepts, or
    'auto': the newest of `output_dir`, None when it has none (a fresh start, so that a first start
    and every restart are one command)."""
    if resume != "auto":
        return resolve(resume)
    try:
        return resolve(output_dir)
    except CheckpointNotFoundError:
        return None


@dataclass(frozen=True)
class Resumed:
    """What `resume` read: the step, `restore`'s dict, why each newer step was skipped, and where
    the newer steps of the run's own folder were moved (None: nothing moved)."""

    step: int
    restored: dict
    skipped: list[str]
    set_aside: Path | None


def resume(ref: CheckpointRef, output_dir: str | Path, *, params: Any, opt_state: Any) -> Resumed:
    """Restore `ref` (or the first good fallback) for a run that writes to `output_dir`: `restore`
    onto the templates' shardings. When that is the checkpoint's own run, its steps newer than the
    one read (damaged ones, or those after a named older step) would stand in the way of the
    run's next saves of the same steps: they are moved aside (`set_aside`), not deleted.
    Every process calls it."""
    mgr = manager(ref.output_dir, read_only=True)
    step, restored, skipped = first_good(ref, lambda s: restore(mgr, s, params=params, opt_state=opt_state))
    moved = None
    if Path(ref.output_dir).absolute() == Path(output_dir).absolute():
        newer = [s for s in mgr.all_steps() if s > step]
        if newer:
            if jax.process_index() == 0:
                moved = set_aside(output_dir, newer)
            # Every process lists the steps again when it first saves: after the move.
            multihost_utils.sync_global_devices("es3_checkpoints_set_aside")
    return Resumed(step, restored, skipped, moved)


def set_aside(output_dir: str | Path, steps: Iterable[int]) -> Path:
    """Move the checkpoints of `steps` out of the run's checkpoints folder into
    `<output_dir>/checkpoints_set_aside/` (a step moved there before gets a numbered name) -> that
    folder. For steps a resumed run will write again: damaged ones, or those after the step it
    resumed from."""
    output_dir = Path(output_dir)
    aside = output_dir / f"{CHECKPOINTS}_set_aside"
    aside.mkdir(exist_ok=True)
    for step in steps:
        target, n = aside / str(step), 1
        while target.exists():
            target, n = aside / f"{step}.{n}", n + 1
        os.replace(output_dir / CHECKPOINTS / str(step), target)
    return aside


def is_reference(path: str | Path) -> bool:
    """Whether `path` names a checkpoint by one of the forms `resolve` accepts other than a run folder."""
    path = Path(path)
    return (
        path.name in ("ckpt_latest", "ckpt_best", CHECKPOINTS)
        or re.fullmatch(r"ckpt_step_\d+", path.name) is not None
        or (path.name.isdigit() and path.parent.name == CHECKPOINTS)
    )


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read(ref: CheckpointRef, *, warn: Callable[[str], None] = _warn) -> tuple[int, dict, dict]:
    """(step read, trainable parameters as saved, meta) of a resolved checkpoint, without a
    template, verified. A damaged newest step falls back to the next (each skipped one is passed
    to `warn`); a damaged named step raises `CheckpointDamagedError`."""
    mgr = manager(ref.output_dir, read_only=True)
    items = {"params": ocp.args.StandardRestore(), "meta": ocp.args.JsonRestore()}
    step, out, skipped = first_good(ref, lambda s: _read(mgr, s, items))
    for message in skipped:
        warn(f"skipped a damaged checkpoint: {message}")
    params = unflatten({k: np.asarray(v) for k, v in flatten(out["params"]).items()})
    return step, params, out["meta"]


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
    if step is None and which == "latest":
        return CheckpointRef(path, steps[-1], tuple(reversed(steps[:-1])))
    if step is None:
        step = mgr.best_step()
        if step is None:
            raise CheckpointNotFoundError(f"{name}: no checkpoint has a validation metric; steps: {steps}")
    elif step not in steps:
        raise CheckpointNotFoundError(f"{name}: step {step} is not among the saved steps {steps}")
    return CheckpointRef(path, step)
