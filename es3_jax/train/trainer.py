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
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from es3_jax import config as config_lib
from es3_jax import distributed
from es3_jax.errors import Es3Error
from es3_jax.params import ModuleTemplate, param_dict
from es3_jax.train.step import TRUNK, Templates


class TrainingError(Es3Error):
    """A run that cannot go on (e.g. too many non-finite steps in a row); a checkpoint was saved first."""


BATCH_KEYS = ("masks", "object_valid", "clip_valid")
RANDOM_TRUNK_SEED = 0  # `es3 embed --seed` default: a random trunk here matches a random-trunk store


@dataclass
class Teacher:
    params: dict
    trunk: dict | None  # trunk parameters, when the weights hold them
    source: str


def load_teacher(cfg: config_lib.Config) -> Teacher:
    """The tracker named by `MODEL.TEACHER_WEIGHTS`: a sam3.pt (or stage-1 / transformers file), an
    es3 weights folder, or "" for random weights from `TRAIN.SEED` (tests, the demo)."""
    from es3_jax.models.tracker import SAM3Tracker, expected_param_shapes

    path = cfg.MODEL.TEACHER_WEIGHTS
    if not path:
        tracker = SAM3Tracker(cfg.MODEL.TEACHER, rngs=nnx.Rngs(cfg.TRAIN.SEED))
        return Teacher(param_dict(tracker), None, f"random (seed {cfg.TRAIN.SEED})")
    path = Path(path)
    if not path.exists():
        raise TrainingError(f"MODEL.TEACHER_WEIGHTS: {path} does not exist")
    if path.is_dir():
        from es3_jax import tracker_weights

        params, _ = tracker_weights.load(path)
        params.pop("student", None)
        trunk = params.pop("trunk", None)
        return Teacher(params, trunk, str(path))
    from porting.sam3_checkpoint import CheckpointError, port_checkpoint, port_trunk

    params = port_checkpoint(path, expected=expected_param_shapes(cfg.MODEL.TEACHER)).params
    try:
        trunk = port_trunk(path)
    except CheckpointError:
        trunk = None
    return Teacher(params, trunk, str(path))


def frozen_trunk(cfg: config_lib.Config, teacher: Teacher) -> tuple[ModuleTemplate, dict, str]:
    """(template, parameters, fingerprint) of the trunk that computes features on the fly, loaded as
    `es3 embed` loads it: the teacher weights' trunk, or a random one with `es3 embed`'s default
    seed when MODEL.TEACHER_WEIGHTS is empty. The fingerprint is the one a store records."""
    from es3_jax.models.trunk import compute_dtype, trunk_fingerprint, trunk_from_config

    if teacher.trunk is not None:
        params = teacher.trunk
    elif not cfg.MODEL.TEACHER_WEIGHTS:
        params = param_dict(trunk_from_config(cfg, seed=RANDOM_TRUNK_SEED))
    else:
        raise config_lib.ConfigError(
            f"DATA.USE_PRECOMPUTED False needs the trunk, but MODEL.TEACHER_WEIGHTS "
            f"{cfg.MODEL.TEACHER_WEIGHTS} holds no trunk weights; give a full sam3.pt, or train on "
            "embeddings written by `es3 embed` (DATA.USE_PRECOMPUTED True)"
        )
    dtype = compute_dtype(cfg.MODEL.COMPUTE_DTYPE)
    template = ModuleTemplate(lambda: trunk_from_config(cfg, seed=0, dtype=dtype))
    # Binding checks every path and shape against the config's trunk before anything compiles.
    params = param_dict(trunk_from_config(cfg, params, dtype=dtype))
    return template, params, trunk_fingerprint(params)


def templates(cfg: config_lib.Config, trunk: ModuleTemplate | None = None) -> Templates:
    """The modules of a run around parameter dicts, computing in MODEL.COMPUTE_DTYPE (parameters stay
    float32), with TRAIN.REMAT's per-layer checkpointing: the tracker, the student when distilling,
    and `trunk` (see `frozen_trunk`)."""
    from es3_jax.models.student import student_from_config
    from es3_jax.models.tracker import SAM3Tracker
    from es3_jax.models.trunk import compute_dtype

    dtype = compute_dtype(cfg.MODEL.COMPUTE_DTYPE)
    remat = cfg.TRAIN.REMAT in ("layer", "frame_layer")
    teacher = ModuleTemplate(
        lambda: SAM3Tracker(cfg.MODEL.TEACHER, rngs=nnx.Rngs(0), dtype=dtype, remat=remat)
    )
    student = None
    if cfg.TRAIN.MODE == "distill":
        student = ModuleTemplate(lambda: student_from_config(cfg, seed=0, dtype=dtype, remat=remat))
    return Templates(teacher, student, trunk)


@dataclass
class Setup:
    """A run's models and optimiser on its mesh, before any data or checkpoint."""

    teacher: Teacher
    templates: Templates
    trainable: dict  # on the devices, sharded by `param_shardings`
    frozen: dict  # on the devices, replicated
    param_shardings: dict
    opt_state: optax.OptState
    train_step: Callable  # `make_train_step`'s jitted step
    trunk_fingerprint: str | None  # of the on-the-fly trunk (`DATA.USE_PRECOMPUTED False`)


def set_up(cfg: config_lib.Config, mesh: Mesh, accumulate: int) -> Setup:
    """The teacher (and a fresh student when distilling) split into trainable and frozen parameters,
    placed on `mesh`, with the optimiser and the compiled train step of `accumulate` micro-batches."""
    from es3_jax.models.student import student_from_config
    from es3_jax.train import optim, sharding
    from es3_jax.train.step import make_train_step, split_trainable

    teacher = load_teacher(cfg)
    student_params = None
    if cfg.TRAIN.MODE == "distill":
        student = student_from_config(
            cfg, teacher_params=teacher.params["memory_attention"], seed=cfg.TRAIN.SEED
        )
        student_params = param_dict(student)
    trainable, frozen = split_trainable(cfg, teacher.params, student_params)
    trunk_template, fingerprint = None, None
    if not cfg.DATA.USE_PRECOMPUTED:
        trunk_template, frozen[TRUNK], fingerprint = frozen_trunk(cfg, teacher)
    run_templates = templates(cfg, trunk_template)
    param_shardings = sharding.param_shardings(trainable, mesh, cfg.MESH)
    frozen = jax.device_put(frozen, sharding.replicated(mesh))
    trainable = jax.device_put(trainable, param_shardings)
    optimizer = optim.make_optimizer(cfg.TRAIN, accumulate)
    opt_state, opt_shardings = sharding.init_optimizer(optimizer, trainable, param_shardings, mesh)
    train_step = make_train_step(run_templates, optimizer, cfg, mesh, param_shardings, opt_shardings)
    return Setup(
        teacher,
        run_templates,
        trainable,
        frozen,
        param_shardings,
        opt_state,
        train_step,
        fingerprint,
    )


def _jf(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """Mean J and F over the valid (clip, frame, object) masks `[N, S, S]`."""
    from es3_jax.eval.metrics import boundary_f_measure, region_similarity

    js, fs = [], []
    for p, g in zip(pred[valid], gt[valid], strict=True):
        js.append(region_similarity(p, g))
        fs.append(boundary_f_measure(p, g))
    return (float(np.mean(js)), float(np.mean(fs))) if js else (math.nan, math.nan)


class Trainer:
    """Builds everything from a config, then `run()`s to `TRAIN.MAX_STEPS` or a signal."""

    def __init__(self, cfg: config_lib.Config, output_dir: str | Path, *, resume: str | None = None):
        from es3_jax.data.pipeline import build_pipeline
        from es3_jax.train import checkpoint, optim, sharding
        from es3_jax.train.metrics_log import MetricsLog
        from es3_jax.train.step import make_eval_step

        cfg = config_lib.validate(cfg)
        self.process_index, self.process_count = distributed.initialize()
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.distill = cfg.TRAIN.MODE == "distill"
        self.mesh = sharding.make_mesh(cfg.MESH)
        local_batch = cfg.TRAIN.BATCH_SIZE * jax.local_device_count()
        self.accumulate = optim.accumulation_steps(cfg.TRAIN, self.mesh.size)
        setup = set_up(cfg, self.mesh, self.accumulate)
        self.teacher, self.templates, self.frozen = setup.teacher, setup.templates, setup.frozen
        self.trunk_fingerprint = setup.trunk_fingerprint
        self.param_shardings, self.train_step = setup.param_shardings, setup.train_step
        trainable, opt_state = setup.trainable, setup.opt_state
        self.eval_step = make_eval_step(self.templates, cfg, self.mesh, self.param_shardings)

        self.checkpoints = checkpoint.manager(
            self.output_dir, keep_latest=cfg.TRAIN.KEEP_LATEST, save_every=cfg.TRAIN.SAVE_EVERY
        )
        self.micro = 0
        self.bad_steps = 0
        self.best = -math.inf
        if resume:
            ref = checkpoint.resolve(self.output_dir if resume == "auto" else resume)
            restored = checkpoint.restore(
                checkpoint.manager(ref.output_dir, read_only=True),
                ref.step,
                params=trainable,
                opt_state=opt_state,
            )
            trainable, opt_state = restored["params"], restored["opt_state"]
            meta = restored["meta"]
            self.micro, self.bad_steps = int(meta["micro_step"]), int(meta["bad_steps"])
            self.best = -math.inf if meta.get("best") is None else float(meta["best"])
        self.trainable, self.opt_state = trainable, opt_state
        self.step = self.micro // self.accumulate
        if self.process_index == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config_lib.save(cfg, self.output_dir / "config.yaml")
        self.log = MetricsLog(
            self.output_dir, tensorboard=cfg.LOG.TENSORBOARD, resume_step=self.step if resume else None
        )
        self.log.info(
            f"mode {cfg.TRAIN.MODE}, teacher {self.teacher.source}, mesh {dict(self.mesh.shape)}, "
            f"{self.process_count} processes, accumulate {self.accumulate}, start step {self.step}"
        )
        if self.trunk_fingerprint is not None:
            self.log.info(f"trunk features computed on the fly by trunk {self.trunk_fingerprint}")
        self.train_data = build_pipeline(
            cfg,
            split="train",
            batch_size=local_batch,
            process_index=self.process_index,
            process_count=self.process_count,
        )
        self.val_data = build_pipeline(
            cfg,
            split="val",
            batch_size=local_batch,
            process_index=self.process_index,
            process_count=self.process_count,
            num_workers=0,
        )
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------------------------------

    def _global(self, batch: Mapping[str, np.ndarray]) -> dict:
        from es3_jax.train.sharding import global_batch

        features = "embeddings" if self.cfg.DATA.USE_PRECOMPUTED else "images"
        return global_batch({k: batch[k] for k in (*BATCH_KEYS, features)}, self.mesh)

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
        from es3_jax.train import checkpoint

        checkpoint.save(
            self.checkpoints,
            self.step,
            params=self.trainable,
            opt_state=self.opt_state,
            data_state={"micro_step": self.micro},
            meta=self._meta(),
            metrics=metrics,
        )
        self.log.info(f"saved checkpoint at step {self.step}")

    def validate(self) -> dict[str, float]:
        """Loss terms and J&F on the held-out clips: of the supervised tracker against the ground
        truth, and (distilling) of the student against the teacher's masks and the teacher against
        the ground truth."""
        from jax.experimental import multihost_utils

        sums: dict[str, float] = {}
        preds, teachers, gts, valids = [], [], [], []
        batches = 0
        for batch in self.val_data:
            g = self._global(batch)
            terms, masks, teacher_masks = self.eval_step(self.trainable, self.frozen, g)
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

    def run(self) -> dict:
        """Train to `TRAIN.MAX_STEPS`; returns the last train and validation metrics."""
        from tqdm import tqdm

        from es3_jax.train.checkpoint import BEST_METRIC
        from es3_jax.train.optim import learning_rate

        cfg = self.cfg.TRAIN
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        total_micro = cfg.MAX_STEPS * self.accumulate
        data = self.train_data.iterator(start_step=self.micro)
        bar = tqdm(
            total=cfg.MAX_STEPS,
            initial=self.step,
            desc=f"{cfg.MODE}",
            unit="step",
            disable=self.process_index != 0,
            dynamic_ncols=True,
            # Redirected to a file (a batch job's log), a bar line every 30 s instead of every step.
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )
        last_train: dict[str, float] = {}
        last_val: dict[str, float] = {}
        window = {"start": time.perf_counter(), "steps": 0}
        try:
            while self.micro < total_micro:
                batch = self._global(next(data))
                self.trainable, self.opt_state, metrics = self.train_step(
                    self.trainable, self.opt_state, self.frozen, batch
                )
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
                if not finite:
                    self.log.warning(
                        f"step {self.step}: non-finite loss, update skipped ({self.bad_steps} in a row)"
                    )
                if self.step % self.cfg.LOG.EVERY == 0 or self.step == cfg.MAX_STEPS:
                    elapsed = time.perf_counter() - window["start"]
                    clips = window["steps"] * self.accumulate * cfg.BATCH_SIZE * self.mesh.size
                    self.log.log(
                        self.step,
                        {
                            **last_train,
                            "lr": float(learning_rate(cfg)(self.step - 1)),
                            "step_time_s": elapsed / max(window["steps"], 1),
                            "clips_per_s": clips / max(elapsed, 1e-9),
                        },
                    )
                    window = {"start": time.perf_counter(), "steps": 0}
                metrics_for_ckpt = None
                if cfg.EVAL_EVERY and (self.step % cfg.EVAL_EVERY == 0 or self.step == cfg.MAX_STEPS):
                    last_val = self.validate()
                    self.log.log(self.step, last_val, prefix="val")
                    metrics_for_ckpt = {BEST_METRIC: last_val["jf"]}
                    self.best = max(self.best, last_val["jf"])
                periodic = cfg.SAVE_EVERY and self.step % cfg.SAVE_EVERY == 0
                if metrics_for_ckpt is not None or periodic or self.step == cfg.MAX_STEPS:
                    self.save(metrics_for_ckpt)
                if self._stop_signal is not None:
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
            "stopped_by_signal": self._stop_signal,
        }

    def trained_params(self) -> dict:
        """The full parameter set the run produced, as numpy arrays: the tracker (fine-tuned parts
        merged in) plus, when distilling, `student`; with `trunk` when the teacher weights held one.

        Every process must call it: parameters sharded across processes are gathered."""
        from es3_jax.train.sharding import replicated

        # One collective replicates the (possibly fsdp-sharded) trainables; a replicated array
        # reads on any process. The frozen parameters are replicated already.
        gathered = jax.jit(lambda tree: tree, out_shardings=replicated(self.mesh))(self.trainable)
        trainable = jax.tree.map(np.asarray, gathered)
        frozen = jax.tree.map(np.asarray, {k: v for k, v in self.frozen.items() if k != TRUNK})
        params = {**frozen, **trainable} if not self.distill else {**frozen, "student": trainable}
        if self.teacher.trunk is not None:
            params[TRUNK] = self.teacher.trunk
        return params

    def export_weights(self, folder: str | Path | None = None) -> Path:
        """Write the trained weights as an es3 weights folder (`<output_dir>/weights` by default),
        loadable by `VideoPredictor.from_checkpoint` and as `MODEL.TEACHER_WEIGHTS`.

        Every process calls it; process 0 writes, the others wait until the folder is complete."""
        from jax.experimental import multihost_utils

        from es3_jax import tracker_weights

        folder = Path(folder) if folder is not None else self.output_dir / "weights"
        report = {
            "source": "es3 train",
            "mode": self.cfg.TRAIN.MODE,
            "step": self.step,
            "teacher": self.teacher.source,
        }
        params = self.trained_params()
        if self.process_index == 0:
            tracker_weights.save(folder, params, self.cfg, report)
        multihost_utils.sync_global_devices("es3_train_export_weights")
        return folder
