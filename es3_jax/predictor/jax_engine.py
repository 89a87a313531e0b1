"""`JaxEngine`: a tracking session's operations, jit-compiled from the tracker and its memory path.

Each operation compiles once per shape (`trace_counts` counts the traces) and is timed into
`timings`; the bank lives on the device in `storage_dtype` (bfloat16, as upstream stores
memories; float32 is what an ONNX export keeps, and matches it to ~1e-6).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from es3_jax import config as config_lib
from es3_jax.data.frames import normalize, resize_frame
from es3_jax.memory.bank import MemoryBank, Selection
from es3_jax.memory.path import memory_tokens
from es3_jax.memory.schedule import BankLayout
from es3_jax.models.tracker import FrameFeatures, SAM3Tracker
from es3_jax.models.trunk import trunk_from_config
from es3_jax.predictor.engine import Heads, Limits
from es3_jax.predictor.prompts import PredictorError


class JaxEngine:
    """The tracker's operations on the JAX device: frames given as images run the trunk (built on
    first use from `trunk_params`, or drawn from `seed`), trunk features the neck."""

    def __init__(
        self,
        cfg: config_lib.Config,
        tracker: SAM3Tracker,
        memory: nnx.Module,
        *,
        trunk_params: Callable[[], dict] | None = None,
        seed: int = 0,
        storage_dtype: Any = jnp.bfloat16,
        objects_per_batch: int | None = None,
    ):
        if objects_per_batch is not None and objects_per_batch < 1:
            raise PredictorError(f"objects_per_batch must be at least 1, got {objects_per_batch}")
        self.cfg = cfg
        self.limits = Limits("the JAX engine", bank_rows=objects_per_batch)
        self.seed = seed
        self.storage_dtype = storage_dtype
        self.timings: dict[str, float] = {}
        self.trace_counts: dict[str, int] = {}
        self._trunk_params = trunk_params
        self._trunk = None
        self._tracker_def, self._tracker_state = nnx.split(tracker)
        self._memory_def, self._memory_state = nnx.split(memory)
        self._tokens = memory_tokens(memory, cfg.MODEL.TEACHER)
        # The jit-compiled operations (name -> function); tools that compile them ahead of time for
        # another device read and wrap them here (benchmarks/gpu_compile.py).
        self.operations = self._compile()

    # ----------------------------------------------------------------------------------------
    # the modules

    def modules(self) -> tuple[SAM3Tracker, nnx.Module, nnx.Module]:
        """(tracker, its memory path, trunk) holding the engine's weights; the trunk is built here
        when no frame has needed it yet."""
        if self._trunk is None:
            self._build_trunk()
        _, tdef, tstate = self._trunk
        return nnx.merge(self._tracker_def, self._tracker_state), self.memory_path(), nnx.merge(tdef, tstate)

    def memory_path(self) -> nnx.Module:
        """The memory path the steps read (the tracker's own, or a student), holding its weights."""
        return nnx.merge(self._memory_def, self._memory_state)

    def _build_trunk(self) -> None:
        params = None if self._trunk_params is None else self._trunk_params()
        tdef, tstate = nnx.split(trunk_from_config(self.cfg, params, seed=self.seed))

        @jax.jit
        def run(state, images):
            self._traced("trunk")
            return nnx.merge(tdef, state)(images)

        self._trunk = (run, tdef, tstate)

    def run_trunk(self, images: np.ndarray) -> jax.Array:
        """Normalised frames `[1, S, S, 3]` -> trunk features, by the trunk built on first use."""
        if self._trunk is None:
            self._build_trunk()
        run, _, state = self._trunk
        return run(state, jnp.asarray(images))

    # ----------------------------------------------------------------------------------------
    # jit-compiled operations (one trace per shape; counted in `trace_counts`)

    def _traced(self, name: str) -> None:
        self.trace_counts[name] = self.trace_counts.get(name, 0) + 1

    def _compile(self) -> dict:
        tdef, mdef = self._tracker_def, self._memory_def

        def features(tstate, trunk_features):
            self._traced("features")
            return nnx.merge(tdef, tstate).frame_features(trunk_features)

        def step(tstate, mstate, frame, bank, sel):
            self._traced("track_step")
            return nnx.merge(tdef, tstate).track_step(nnx.merge(mdef, mstate), frame, bank, sel)

        def mask_prompt(tstate, frame, mask):
            self._traced("mask_prompt")
            return nnx.merge(tdef, tstate).mask_prompt(frame, mask)

        def click_prompt(tstate, frame, coords, labels, prev, multimask):
            self._traced("click_prompt")
            return nnx.merge(tdef, tstate).click_prompt(
                frame, coords, labels, prev, multimask_output=multimask
            )

        def prompt_top(tstate, low_res, prompted):
            self._traced("prompt_top")
            return nnx.merge(tdef, tstate).prompt_top(low_res, prompted)

        def prompt_memory(tstate, mstate, frame, bank, low_res, scores, obj_ptr, prompted, slot, top):
            self._traced("prompt_memory")
            tracker = nnx.merge(tdef, tstate)
            if top is None:
                _, top = tracker.prompt_top(low_res, prompted)
            tokens, tokens_pos = tracker.prompt_memory(
                nnx.merge(mdef, mstate), frame, low_res, scores, prompted, top
            )
            return bank.write(tokens, tokens_pos, obj_ptr, slot, slot, prompted)

        return {
            "features": jax.jit(features),
            "step": jax.jit(step, donate_argnums=(3,)),
            "mask_prompt": jax.jit(mask_prompt),
            "click_prompt": jax.jit(click_prompt, static_argnums=(5,)),
            "prompt_top": jax.jit(prompt_top),
            "prompt_memory": jax.jit(prompt_memory, donate_argnums=(3,)),
        }

    def timed(self, name: str, fn: Callable, *args) -> Any:
        """`fn(*args)`, waited for, its milliseconds added to `timings[name]`."""
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        self.timings[name] = self.timings.get(name, 0.0) + 1000 * (time.perf_counter() - start)
        return out

    # ----------------------------------------------------------------------------------------
    # the engine's operations

    def stream_frame(self, frame: np.ndarray) -> tuple[jax.Array, tuple[int, int]]:
        """`[H, W, 3]` uint8 RGB (run through the trunk now) or trunk features `[g, g, Ct]` float."""
        t = self.cfg.MODEL.TEACHER
        if frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[-1] == 3:
            data = self.cfg.DATA
            image = normalize(resize_frame(frame, t.IMAGE_SIZE), data.PIXEL_MEAN, data.PIXEL_STD)[None]
            return self.timed("trunk", self.run_trunk, image), frame.shape[:2]
        if frame.shape == (t.grid, t.grid, t.TRUNK_DIM) and np.issubdtype(frame.dtype, np.floating):
            return jnp.asarray(frame[None], jnp.float32), (t.IMAGE_SIZE, t.IMAGE_SIZE)
        raise PredictorError(
            f"a stream frame must be [H, W, 3] uint8 or trunk features [{t.grid}, {t.grid}, "
            f"{t.TRUNK_DIM}] float, got {frame.dtype} {frame.shape}"
        )

    def frame(self, trunk_features: jax.Array) -> FrameFeatures:
        """Trunk features `[1, g, g, Ct]` -> the tracker's features of the frame."""
        return self.timed("neck", self.operations["features"], self._tracker_state, trunk_features)

    def mask_prompt(self, frame: FrameFeatures, mask: np.ndarray) -> Heads:
        out = self.timed(
            "prompt",
            self.operations["mask_prompt"],
            self._tracker_state,
            frame,
            jnp.asarray(mask)[None, ..., None],
        )
        return Heads(None, np.array(out.obj_ptr), np.array(out.object_score_logits), np.array(out.iou_score))

    def click_prompt(
        self,
        frame: FrameFeatures,
        coords: np.ndarray,
        labels: np.ndarray,
        previous: np.ndarray | None,
        multimask: bool,
    ) -> Heads:
        out = self.timed(
            "prompt",
            self.operations["click_prompt"],
            self._tracker_state,
            frame,
            jnp.asarray(coords)[None],
            jnp.asarray(labels)[None],
            None if previous is None else jnp.asarray(previous)[None],
            multimask,
        )
        return _heads(out)

    def new_bank(self, rows: int, layout: BankLayout) -> MemoryBank:
        t = self.cfg.MODEL.TEACHER
        return MemoryBank.empty(
            rows, layout.slots, layout.pointer_slots, self._tokens, t.D_MODEL, self.storage_dtype
        )

    def grow_bank(self, bank: MemoryBank, rows: int, new_slots: int, at: int) -> MemoryBank:
        return bank.grown(rows, new_slots, at)

    def prompt_top(
        self, frame: FrameFeatures, low_res: np.ndarray, prompted: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        best, top = self.operations["prompt_top"](
            self._tracker_state, jnp.asarray(low_res), jnp.asarray(prompted)
        )
        return np.array(best), np.array(top)

    def prompt_memory(
        self,
        frame: FrameFeatures,
        bank: MemoryBank,
        low_res: np.ndarray,
        scores: np.ndarray,
        obj_ptr: np.ndarray,
        prompted: np.ndarray,
        slots: np.ndarray,
        top: np.ndarray | None,
    ) -> MemoryBank:
        return self.timed(
            "prompt_memory",
            self.operations["prompt_memory"],
            self._tracker_state,
            self._memory_state,
            frame,
            bank,
            *map(jnp.asarray, (low_res, scores, obj_ptr, prompted, slots)),
            None if top is None else jnp.asarray(top),
        )

    def track_step(
        self, frame: FrameFeatures, bank: MemoryBank, reads: dict[str, np.ndarray]
    ) -> tuple[Heads, MemoryBank]:
        sel = Selection(**{k: jnp.asarray(v) for k, v in reads.items()})
        out, bank = self.timed(
            "track_step", self.operations["step"], self._tracker_state, self._memory_state, frame, bank, sel
        )
        return dataclasses.replace(_heads(out), presence=np.array(out.presence)), bank


def _heads(out: Any) -> Heads:
    """A tracker output (`low_res_masks`, `obj_ptr`, `object_score_logits`, `iou_score`) as host
    copies: a view would keep the device buffer alive for as long as a prompt keeps it."""
    return Heads(
        np.array(out.low_res_masks),
        np.array(out.obj_ptr),
        np.array(out.object_score_logits),
        np.array(out.iou_score),
    )
