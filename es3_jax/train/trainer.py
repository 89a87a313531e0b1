"""`es3 train`: the training run — models, data, sharded steps, validation, checkpoints, resume.

One loop for both modes (`TRAIN.MODE`): `distill` trains the student memory against the frozen
teacher, `finetune` trains the tracker's memory attention, memory encoder and mask decoder on the
ground truth. Steps count optimiser updates; with gradient accumulation each one consumes
`accumulate` micro-batches. Everything a run needs to continue exactly is in its checkpoints (the
data position is the micro-step: the pipeline is a pure function of it).

The trunk features come from the embedding store (`DATA.USE_PRECOMPUTED True`) or, with
`DATA.USE_PRECOMPUTED False`, from the frozen trunk run inside the jitted step on the pipeline's
frames (its parameters travel in `frozen["trunk"]`, replicated).

Several processes run the same loop in lock step: each feeds its rows of the global batch, all of
them call every collective (steps, validation gathers, checkpoint saves, the weight export), and
only process 0 writes logs, the config and the exported weights.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from es3_jax import checkpoints, distributed, weights
from es3_jax import config as config_lib
from es3_jax.data.indexing import index_dataset, problem_report
from es3_jax.data.pipeline import build_pipeline, open_store
from es3_jax.errors import Es3Error
from es3_jax.eval.metrics import boundary_f_measure, region_similarity
from es3_jax.models.student import student_from_config
from es3_jax.models.tracker import SAM3Tracker
from es3_jax.models.trunk import compute_dtype, trunk_fingerprint, trunk_from_config
from es3_jax.params import ModuleTemplate, param_dict
from es3_jax.train import optim, sharding
from es3_jax.train.metrics_log import MetricsLog
from es3_jax.train.step import TRUNK, Templates, make_eval_step, make_train_step, split_trainable


class TrainingError(Es3Error):
    """A run that cannot go on (e.g. too many non-finite steps in a row); a checkpoint was saved first."""


BATCH_KEYS = ("masks", "object_valid", "clip_valid")
RANDOM_TRUNK_SEED = 0  # `es3 embed --seed` default: a random trunk here matches a random-trunk store


def due(step: int, every: int, last: int) -> bool:
    """Whether something done every `every` steps (0: never) is due at `step`; the last step always is."""
    return every > 0 and (step % every == 0 or step == last)


def frozen_trunk(cfg: config_lib.Config, teacher: weights.Weights) -> tuple[ModuleTemplate, dict, str]:
    """(template, parameters, fingerprint) of the trunk that computes features on the fly, loaded as
    `es3 embed` loads it: the teacher weights' trunk, or a random one with `es3 embed`'s default
    seed when the teacher is random. The fingerprint is the one a store records."""
    params = teacher.trunk_params(RANDOM_TRUNK_SEED)
    dtype = compute_dtype(cfg.MODEL.COMPUTE_DTYPE)
    template = ModuleTemplate(lambda: trunk_from_config(cfg, seed=0, dtype=dtype))
    # Binding checks every path and shape against the config's trunk before anything compiles.
    params = param_dict(trunk_from_config(cfg, params, dtype=dtype))
    return template, params, trunk_fingerprint(params)


def templates(cfg: config_lib.Config, trunk: ModuleTemplate | None = None) -> Templates:
    """The modules of a run around parameter dicts, computing in MODEL.COMPUTE_DTYPE (parameters stay
    float32), with TRAIN.REMAT's per-layer checkpointing: the tracker, the student when distilling,
    and `trunk` (see `frozen_trunk`)."""
    dtype = compute_dtype(cfg.MODEL.COMPUTE_DTYPE)
    remat = cfg.TRAIN.REMAT in ("layer", "frame_layer")
    teacher = ModuleTemplate(
        lambda: SAM3Tracker(cfg.MODEL.TEACHER, rngs=nnx.Rngs(0), dtype=dtype, remat=remat)
    )
    student = None
    if cfg.TRAIN.MODE == "distill":
        student = ModuleTemplate(lambda: student_from_config(cfg, seed=0, dtype=dtype, remat=remat))
    return Templates(teacher, student, trunk)


def _abstract(tree, shardings):
    """`jax.ShapeDtypeStruct`s of `tree`'s arrays, placed by `shardings` (same structure)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


class Learner:
    """A run's models on its mesh: the frozen teacher (and trunk), what the optimiser updates (a fresh
    student when distilling, the `TRAIN.FINETUNE_MODULES` of the tracker when fine-tuning), and the
    compiled train and evaluation steps over them.

    teacher: `weights.teacher(cfg, ...)`. The trainable parameters are sharded by
    `MESH.PARAM_RULES`, the frozen ones replicated; `step` updates them in place.
    """

    def __init__(
        self,
        cfg: config_lib.Config,
        mesh: Mesh,
        accumulate: int,
        teacher: weights.Weights,
        *,
        abstract: bool = False,
    ):
        """abstract: hold the parameters and optimiser state as `jax.ShapeDtypeStruct`s on `mesh`
        instead of arrays: the steps can then be lowered and compiled, not run, and `mesh` may be of
        devices that are not here (`es3 bench plan --target`)."""
        self.cfg, self.mesh, self.teacher = cfg, mesh, teacher
        student = None
        if cfg.TRAIN.MODE == "distill":
            fresh = student_from_config(
                cfg, teacher_params=teacher.tracker["memory_attention"], seed=cfg.TRAIN.SEED
            )
            student = param_dict(fresh)
        trainable, frozen = split_trainable(cfg, teacher.tracker, student)
        trunk, self.trunk_fingerprint = None, None
        if not cfg.DATA.USE_PRECOMPUTED:
            trunk, frozen[TRUNK], self.trunk_fingerprint = frozen_trunk(cfg, teacher)
        self.templates = templates(cfg, trunk)
        self.param_shardings = sharding.param_shardings(trainable, mesh, cfg.MESH)
        optimizer = optim.make_optimizer(cfg.TRAIN, accumulate)
        frozen_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), frozen)
        if abstract:
            opt_shardings = sharding.optimizer_shardings(optimizer, trainable, self.param_shardings, mesh)
            self.frozen = _abstract(frozen, frozen_shardings)
            self.trainable = _abstract(trainable, self.param_shardings)
            self.opt_state = _abstract(jax.eval_shape(optimizer.init, trainable), opt_shardings)
        else:
            self.frozen = jax.device_put(frozen, frozen_shardings)
            self.trainable = jax.device_put(trainable, self.param_shardings)
            self.opt_state, opt_shardings = sharding.init_optimizer(
                optimizer, self.trainable, self.param_shardings, mesh
            )
        self.train_step = make_train_step(
            self.templates, optimizer, cfg, mesh, self.param_shardings, opt_shardings
        )
        self.eval_step = make_eval_step(self.templates, cfg, mesh, self.param_shardings)

    def step(self, batch: Mapping[str, jax.Array]) -> dict:
        """One optimiser (micro-)step on a global batch -> its metrics."""
        self.trainable, self.opt_state, metrics = self.train_step(
            self.trainable, self.opt_state, self.frozen, batch
        )
        return metrics

    def evaluate(self, batch: Mapping[str, jax.Array]):
        """(loss terms, masks, teacher masks) of a global batch (see `make_eval_step`)."""
        return self.eval_step(self.trainable, self.frozen, batch)

    def lower(self, batch) -> jax.stages.Lowered:
        """The train step lowered for a batch of arrays or ShapeDtypeStructs (ahead-of-time planning)."""
        return self.train_step.lower(self.trainable, self.opt_state, self.frozen, batch)

    def lower_eval(self, batch) -> jax.stages.Lowered:
        """The evaluation step lowered, as `lower`."""
        return self.eval_step.lower(self.trainable, self.frozen, batch)

    def trained_weights(self, step: int, source: str) -> weights.Weights:
        """The weights the run produced, as numpy arrays: the tracker (fine-tuned parts merged in), the
        student when distilling, and the teacher's trunk when it had one.

        Every process must call it: parameters sharded across processes are gathered."""
        # One collective replicates the (possibly fsdp-sharded) trainables; a replicated array reads
        # on any process. The frozen parameters are replicated already.
        gathered = jax.jit(lambda tree: tree, out_shardings=sharding.replicated(self.mesh))(self.trainable)
        trainable = jax.tree.map(np.asarray, gathered)
        frozen = jax.tree.map(np.asarray, {k: v for k, v in self.frozen.items() if k != TRUNK})
        distill = self.cfg.TRAIN.MODE == "distill"
        return weights.Weights(
            self.cfg,
            source,
            "weights_folder",
            tracker=frozen if distill else {**frozen, **trainable},
            student=trainable if distill else None,
            trunk=self.teacher.trunk,
            trained={} if distill else trainable,
            step=step,
            report={"mode": self.cfg.TRAIN.MODE, "teacher": self.teacher.source},
        )


def _jf(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """Mean J and F over the valid (clip, frame, object) masks `[N, S, S]`."""
    js, fs = [], []
    for p, g in zip(pred[valid], gt[valid], strict=True):
        js.append(region_similarity(p, g))
        fs.append(boundary_f_measure(p, g))
    return (float(np.mean(js)), float(np.mean(fs))) if js else (math.nan, math.nan)


class Trainer:
    """Builds everything from a config, then `run()`s to `TRAIN.MAX_STEPS` or a signal."""

    def __init__(self, cfg: config_lib.Config, output_dir: str | Path, *, resume: str | None = None):
        cfg = config_lib.validate(cfg)
        self.process_index, self.process_count = distributed.initialize()
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.distill = cfg.TRAIN.MODE == "distill"
        self.mesh = sharding.make_mesh(cfg.MESH)
        local_batch = cfg.TRAIN.BATCH_SIZE * jax.local_device_count()
        self.accumulate = optim.accumulation_steps(cfg.TRAIN, self.mesh.size)
        # Reported once the log exists: nothing is written in the output folder before the run starts.
        notes: list[tuple[str, str]] = []
        # A name that resolves to nothing fails before anything is built.
        ref = checkpoints.resume_ref(resume, self.output_dir) if resume else None
        if resume == "auto" and ref is None:
            notes.append(
                ("info", f"--resume auto: no checkpoint under {self.output_dir}; starting at step 0")
            )
        teacher = weights.teacher(cfg, trunk=not cfg.DATA.USE_PRECOMPUTED)
        # A stage-1 teacher checkpoint says which student trunk made (or makes) the features.
        cfg = self.cfg = config_lib.apply_overrides(cfg, ["MODEL.TRUNK.KIND", teacher.cfg.MODEL.TRUNK.KIND])
        # The data before the models: a store of another trunk or a missing video fails in seconds,
        # not after the teacher and student are placed on the mesh. Both splits share one index
        # (reading every annotation file once).
        store = open_store(cfg) if cfg.DATA.USE_PRECOMPUTED else None
        index = index_dataset(cfg, store=store)
        pipelines = {
            split: build_pipeline(
                cfg,
                split=split,
                batch_size=local_batch,
                process_index=self.process_index,
                process_count=self.process_count,
                num_workers=0 if split == "val" else None,
                store=store,
                index=index,
            )
            for split in ("train", "val")
        }
        self.train_data, self.val_data = pipelines["train"], pipelines["val"]
        self.learner = Learner(cfg, self.mesh, self.accumulate, teacher)

        self._checkpoints: ocp.CheckpointManager | None = None  # created by the first save
        self.micro = 0
        self.bad_steps = 0
        self.best = -math.inf
        self._saved_step: int | None = None  # the step whose checkpoint is on disk now
        if ref is not None:
            self._restore(ref, notes)
        self.step = self.micro // self.accumulate
        if self.process_index == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config_lib.save(cfg, self.output_dir / "config.yaml")
        self.log = MetricsLog(
            self.output_dir,
            tensorboard=cfg.LOG.TENSORBOARD,
            resume_step=self.step if ref is not None else None,
        )
        for level, message in notes:
            getattr(self.log, level)(message)
        self.log.info(
            f"mode {cfg.TRAIN.MODE}, teacher {teacher.source}, mesh {dict(self.mesh.shape)}, "
            f"{self.process_count} processes, accumulate {self.accumulate}, start step {self.step}"
        )
        if self.learner.trunk_fingerprint is not None:
            self.log.info(f"trunk features computed on the fly by trunk {self.learner.trunk_fingerprint}")
        # The videos the index left out (both splits share one index), named before the first step.
        lines, record = problem_report(self.train_data.problems)
        for line in lines:
            self.log.warning(line)
        if len(self.train_data.sources) > 1:
            mix = self.train_data.mixing()
            record.update(mix)
            self.log.info(
                "data: sources "
                + ", ".join(
                    f"{n} (weight {mix[f'weight/{n}']:.3g}, {mix[f'epoch_clips/{n}']:.0f} clips an epoch)"
                    for n in self.train_data.sources
                )
            )
        if record:
            self.log.log(self.step, record, prefix="data")
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------------------------------

    def _restore(self, ref: checkpoints.CheckpointRef, notes: list[tuple[str, str]]) -> None:
        """Continue from `ref` (the newest good step when it names the latest)."""
        resumed = checkpoints.resume(
            ref, self.output_dir, params=self.learner.trainable, opt_state=self.learner.opt_state
        )
        notes += [("warning", f"skipped a damaged checkpoint: {message}") for message in resumed.skipped]
        if resumed.set_aside is not None:
            notes.append(("warning", f"moved the steps after step {resumed.step} to {resumed.set_aside}"))
        notes.append(("info", f"resumed from {ref.output_dir} step {resumed.step}"))
        restored = resumed.restored
        self.learner.trainable, self.learner.opt_state = restored["params"], restored["opt_state"]
        meta = restored["meta"]
        self.micro, self.bad_steps = int(meta["micro_step"]), int(meta["bad_steps"])
        self.best = -math.inf if meta.get("best") is None else float(meta["best"])
        if ref.output_dir.absolute() == self.output_dir.absolute():
            self._saved_step = resumed.step

    def _manager(self) -> ocp.CheckpointManager:
        if self._checkpoints is None:
            train = self.cfg.TRAIN
            self._checkpoints = checkpoints.manager(
                self.output_dir, keep_latest=train.KEEP_LATEST, save_every=train.SAVE_EVERY
            )
        return self._checkpoints

    def _global(self, batch: Mapping[str, np.ndarray]) -> dict:
        features = "embeddings" if self.cfg.DATA.USE_PRECOMPUTED else "images"
        return sharding.global_batch({k: batch[k] for k in (*BATCH_KEYS, features)}, self.mesh)

    def _meta(self) -> dict:
        return {
            "step": self.step,
            "micro_step": self.micro,
            "bad_steps": self.bad_steps,
            "best": self.best if math.isfinite(self.best) else None,
            "mode": self.cfg.TRAIN.MODE,
            "config": config_lib.to_dict(self.cfg),
        }

    def save(self, metrics: Mapping[str, float] | None = None) -> None:
        """Checkpoint the current step, unless it is on disk already (a periodic save, then a
        signal or a stop at the same step)."""
        if self._saved_step == self.step:
            return
        checkpoints.save(
            self._manager(),
            self.step,
            params=self.learner.trainable,
            opt_state=self.learner.opt_state,
            data_state={"micro_step": self.micro},
            meta=self._meta(),
            metrics=metrics,
        )
        self._saved_step = self.step
        self.log.info(f"saved checkpoint at step {self.step}")

    def validate(self) -> dict[str, float]:
        """Loss terms and J&F on the held-out clips: of the supervised tracker against the ground
        truth, and (distilling) of the student against the teacher's masks and the teacher against
        the ground truth."""
        sums: dict[str, float] = {}
        preds, teachers, gts, valids = [], [], [], []
        batches = 0
        for batch in self.val_data:
            g = self._global(batch)
            terms, masks, teacher_masks = self.learner.evaluate(g)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            batches += 1
            pred, teacher, gt, valid = (
                np.asarray(x)
                for x in multihost_utils.process_allgather(
                    (masks, teacher_masks, g["masks"], g["object_valid"] & g["clip_valid"][:, None]),
                    tiled=True,
                )
            )
            t = pred.shape[1]
            preds.append(pred[:, 1:])
            teachers.append(teacher[:, 1:])
            gts.append(gt[:, 1:])
            valids.append(np.broadcast_to(valid[:, None], (valid.shape[0], t - 1, valid.shape[1])))
        out = {k: v / max(batches, 1) for k, v in sums.items()}
        pred, teacher, gt, valid = (np.concatenate(x) for x in (preds, teachers, gts, valids))
        j, f = _jf(pred, gt, valid)
        out.update({"j": j, "f": f, "jf": (j + f) / 2})
        if self.distill:
            j, f = _jf(pred, teacher, valid)
            out["jf_vs_teacher"] = (j + f) / 2
            j, f = _jf(teacher, gt, valid)
            out["teacher_jf"] = (j + f) / 2
            out["teacher_mask_area"] = float(teacher[valid].mean()) if valid.any() else math.nan
        out["mask_area"] = float(pred[valid].mean()) if valid.any() else math.nan
        return out

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def run(self, on_step: Callable[[int], None] | None = None) -> dict:
        """Train to `TRAIN.MAX_STEPS` or until SIGTERM / SIGINT (the current step is finished and
        saved) -> the step reached, the last train and validation metrics, and the signal that
        stopped the run before its last step (None when it completed).

        on_step: called with the step reached after each optimiser step, instead of drawing a
        progress bar."""
        cfg = self.cfg.TRAIN
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        total_micro = cfg.MAX_STEPS * self.accumulate
        data = self.train_data.iterator(start_step=self.micro)
        bar = tqdm(
            total=cfg.MAX_STEPS,
            initial=self.step,
            desc=f"{cfg.MODE}",
            unit="step",
            disable=self.process_index != 0 or on_step is not None,
            dynamic_ncols=True,
            # Redirected to a file (a batch job's log), a bar line every 30 s instead of every step.
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )
        last_train: dict[str, float] = {}
        last_val: dict[str, float] = {}
        window = {"start": time.perf_counter(), "steps": 0}
        sources = np.zeros(len(self.train_data.sources), np.int64)  # clips of each source this window
        try:
            while self.micro < total_micro:
                batch = next(data)
                sources += np.bincount(batch["source"], minlength=len(sources))
                metrics = self.learner.step(self._global(batch))
                self.micro += 1
                finite = bool(metrics["finite"])
                self.bad_steps = 0 if finite else self.bad_steps + 1
                if self.bad_steps >= cfg.MAX_BAD_STEPS:
                    self.save()
                    raise TrainingError(
                        f"{self.bad_steps} non-finite steps in a row at step {self.step} "
                        f"(TRAIN.MAX_BAD_STEPS {cfg.MAX_BAD_STEPS}); saved a checkpoint; last loss {metrics['total']}"
                    )
                if self.micro % self.accumulate:
                    continue
                self.step = self.micro // self.accumulate
                window["steps"] += 1
                last_train = {k: float(v) for k, v in metrics.items() if k != "finite"}
                bar.set_postfix(loss=f"{last_train['total']:.4g}", refresh=False)
                bar.update(1)
                if on_step is not None:
                    on_step(self.step)
                if not finite:
                    self.log.warning(
                        f"step {self.step}: non-finite loss, update skipped ({self.bad_steps} in a row)"
                    )
                if due(self.step, self.cfg.LOG.EVERY, cfg.MAX_STEPS):
                    elapsed = time.perf_counter() - window["start"]
                    clips = window["steps"] * self.accumulate * cfg.BATCH_SIZE * self.mesh.size
                    self.log.log(
                        self.step,
                        {
                            **last_train,
                            "lr": float(optim.learning_rate(cfg)(self.step - 1)),
                            "step_time_s": elapsed / max(window["steps"], 1),
                            "clips_per_s": clips / max(elapsed, 1e-9),
                            # This process's clips; every process draws the same mix.
                            **{
                                f"data/share/{n}": float(c / max(sources.sum(), 1))
                                for n, c in zip(self.train_data.sources, sources, strict=True)
                                if len(sources) > 1
                            },
                        },
                    )
                    window = {"start": time.perf_counter(), "steps": 0}
                    sources[:] = 0
                metrics_for_ckpt = None
                if due(self.step, cfg.EVAL_EVERY, cfg.MAX_STEPS):
                    last_val = self.validate()
                    self.log.log(self.step, last_val, prefix="val")
                    metrics_for_ckpt = {checkpoints.BEST_METRIC: last_val["jf"]}
                    self.best = max(self.best, last_val["jf"])
                last = self.step == cfg.MAX_STEPS
                if metrics_for_ckpt is not None or due(self.step, cfg.SAVE_EVERY, cfg.MAX_STEPS) or last:
                    self.save(metrics_for_ckpt)
                if self._stop_signal is not None and last:
                    self.log.warning(f"signal {self._stop_signal} during the last step: the run completes")
                elif self._stop_signal is not None:
                    self.save(metrics_for_ckpt)
                    self.log.warning(f"signal {self._stop_signal}: saved step {self.step} and stopped")
                    break
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.log.close()
        return {
            "step": self.step,
            "train": last_train,
            "val": last_val,
            # A signal during the last step stopped nothing: the run is complete.
            "stopped_by_signal": self._stop_signal if self.step < cfg.MAX_STEPS else None,
        }

    def export_weights(self, folder: str | Path | None = None) -> Path:
        """Write the trained weights as an es3 weights folder (`<output_dir>/weights` by default),
        loadable by `VideoPredictor.from_checkpoint` and as `MODEL.TEACHER_WEIGHTS`.

        Every process calls it; process 0 writes, the others wait until the folder is complete."""
        folder = Path(folder) if folder is not None else self.output_dir / "weights"
        trained = self.learner.trained_weights(self.step, f"es3 train {self.output_dir}")
        if self.process_index == 0:
            weights.save(folder, trained)
        multihost_utils.sync_global_devices("es3_train_export_weights")
        return folder
