"""`VideoPredictor`: the user-facing video tracking API, with SAM2/SAM3 predictor semantics.

```python
predictor = VideoPredictor.from_checkpoint("sam3.pt")
state = predictor.init_state("video_frames/")            # or "clip.mp4", frames [T,H,W,3] uint8, (store, video)
predictor.add_new_mask(state, 0, obj_id=1, mask=mask)     # or add_new_points_or_box(...)
for frame_idx, obj_ids, logits in predictor.propagate_in_video(state):
    ...                                                   # logits [O, H, W] at video resolution
```

Differences from upstream's predictor, all about memory and objects:

* Memory is bounded. Upstream keeps every frame's memory for the life of the state (the cause
  of out-of-memory on long videos, sam3 issues #481, #408). Here the state holds a fixed-size
  bank on the device: the prompted frames' memories plus the few recent frames a step can
  still read (`num_maskmem` spatial frames and 16 pointers; with memory selection, the latest
  frames whose score passes the threshold). Outputs are yielded one frame at a time and not kept.
  Each `propagate_in_video` call starts from the prompted frames' memories: a second pass (e.g.
  reverse after forward) does not read the first pass's tracked frames, as upstream would when a
  pass starts between prompted frames.
* Streams: `init_stream`, then `add_frame` / `track_frame` per frame, with the memory of a forward
  pass; prompts go on the newest frame before it is tracked.
* Corrections: a prompt on a frame an earlier pass tracked decodes clicks with that pass's logits
  fed back and makes the frame a conditioning frame for every object tracked there (the others
  with their output of the pass), as upstream does; the pass is replayed to that frame to get them.
* Objects may join later (the SA-V / YouTube-VOS protocol). Add every prompt, on whatever frame
  the object first appears, before calling `propagate_in_video` once: an object is tracked from
  its first prompted frame on (in the direction of propagation), and its logits are
  `NO_OBJ_SCORE` before that. A frame is a conditioning frame only for the objects prompted on
  it; the other objects are tracked through it. With every object prompted on the same frames
  this is exactly upstream's batched behaviour.
* Many objects: `objects_per_batch` bounds how many share one bank and step.
* Points and boxes are in video pixels (x, y), as SAM2's predictor takes them.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from es3_jax import config as config_lib
from es3_jax import weights
from es3_jax.data.frames import normalize, resize_frame
from es3_jax.interpolation import resize_bilinear
from es3_jax.logits import NO_OBJ_SCORE
from es3_jax.memory.bank import MemoryBank, Selection
from es3_jax.memory.policy import bank_policy
from es3_jax.memory.schedule import BankLayout, MemorySchedule, frame_score
from es3_jax.models.student import student_from_config
from es3_jax.models.tracker import FrameFeatures, SAM3Tracker, build_tracker, expected_param_shapes
from es3_jax.models.trunk import trunk_from_config
from es3_jax.params import unflatten
from es3_jax.predictor.frame_sources import FrameSource, Video, open_video
from es3_jax.predictor.prompts import (
    PredictorError,
    Prompt,
    Prompts,
    carve,
    click_inputs,
    copy_prompts,
    frame_prompt_logits,
    low_res_of,
    mask_inputs,
    started,
)
from es3_jax.predictor.stream import FrameStream


@dataclasses.dataclass
class FrameOutput:
    """Every object's result on one frame at the model's mask resolution (O objects)."""

    low_res: np.ndarray  # [O, 4g, 4g] logits (NO_OBJ_SCORE for objects not started)
    obj_ptr: np.ndarray  # [O, C]
    object_score: np.ndarray  # [O]
    iou: np.ndarray  # [O]
    tracked: np.ndarray  # [O] bool: tracked through memory on this frame (started, not prompted)


@dataclasses.dataclass
class Pass:
    """A propagation that ran, kept so that it can be replayed up to any frame it tracked: a
    correction on such a frame starts from the pass's output there, as upstream's does."""

    prompts: Prompts  # as they were when the pass started
    num_objects: int
    order: list[int]
    reverse: bool
    done: int = 0  # frames of `order` tracked so far
    replayed: dict[int, FrameOutput] = dataclasses.field(default_factory=dict)  # frame -> output


@dataclasses.dataclass
class Memory:
    """The memory of one pass or stream: the schedule over every object, and one fixed-size bank
    per batch of `rows` objects (rows None: all objects in one bank, which grows as they join)."""

    schedule: MemorySchedule
    rows: int | None
    banks: list[MemoryBank] = dataclasses.field(default_factory=list)

    @property
    def bank_rows(self) -> int:
        return self.rows or self.schedule.num_objects

    def batches(self) -> list[range]:
        """The objects of each bank."""
        o, rows = self.schedule.num_objects, self.bank_rows
        return [range(s, min(s + rows, o)) for s in range(0, o, rows)]

    def add_objects(self, count: int) -> None:
        self.schedule.add_objects(count)
        if self.rows is None and self.banks:
            self.banks[0] = self.banks[0].grown(self.schedule.num_objects)

    def bank(self, i: int, tokens_shape: tuple[int, int], dim: int, dtype: Any) -> MemoryBank:
        """Bank `i`, made (zeroed) on first use."""
        lay = self.schedule.layout
        while len(self.banks) <= i:
            self.banks.append(
                MemoryBank.empty(self.bank_rows, lay.slots, lay.pointer_slots, tokens_shape, dim, dtype)
            )
        return self.banks[i]

    def condition(self, obj: int, frame: int) -> tuple[int, list[int]]:
        """A conditioning slot for `obj`'s prompt on `frame`, and the frames whose slots a stream
        forgot to make room. A stream frees the slots no later frame reads; where that is not
        enough (many prompts within a few frames), every bank gets 4 more conditioning slots."""
        schedule = self.schedule
        forgotten = []
        if schedule.needs_slot(obj, frame):
            if schedule.num_frames is None:
                forgotten = schedule.forget_cond(obj, frame)
            if schedule.needs_slot(obj, frame):
                cond = schedule.layout.cond
                schedule.layout = schedule.layout.with_cond(cond + 4)
                self.banks = [b.grown(b.tokens.shape[0], 4, at=cond) for b in self.banks]
        return schedule.condition(obj, frame), forgotten


@dataclasses.dataclass
class State:
    """An inference state: the video (or stream), the prompts, and the bounded memory."""

    source: FrameSource | FrameStream
    obj_ids: list[int] = dataclasses.field(default_factory=list)
    prompts: Prompts = dataclasses.field(default_factory=dict)
    memory: Memory | None = None
    cached: tuple[int, FrameFeatures] | None = None
    passes: list[Pass] = dataclasses.field(default_factory=list)

    @property
    def is_stream(self) -> bool:
        return isinstance(self.source, FrameStream)

    @property
    def num_frames(self) -> int:
        return self.source.num_frames

    @property
    def video_size(self) -> tuple[int, int]:
        """(H, W) of the output masks."""
        return self.source.video_size

    @property
    def num_objects(self) -> int:
        return len(self.obj_ids)


def _rows(x: np.ndarray, batch: range, rows: int, fill: Any = 0) -> np.ndarray:
    """Rows `batch` of x, padded with `fill` to `rows` rows (every bank has one shape)."""
    out = np.full((rows, *x.shape[1:]), fill, x.dtype)
    out[: len(batch)] = x[batch.start : batch.stop]
    return out


class VideoPredictor:
    """Tracks objects through a video with the SAM3 tracker (teacher) or a distilled student."""

    def __init__(
        self,
        cfg: config_lib.Config,
        tracker: SAM3Tracker,
        *,
        student: nnx.Module | None = None,
        trunk_params: Callable[[], dict] | None = None,
        seed: int = 0,
        storage_dtype: Any = jnp.bfloat16,
        objects_per_batch: int | None = None,
    ):
        """trunk_params: gives the trunk's parameters when frames (not features) are tracked; None
        draws a random trunk from `seed`. objects_per_batch: objects tracked together in one bank
        and step (None: all of them); many objects then take several steps per frame but device
        memory of at most this many. storage_dtype: of the bank's memory tokens (bfloat16, as
        upstream stores memories; float32 is what an ONNX export keeps, and matches it to ~1e-6)."""
        if objects_per_batch is not None and objects_per_batch < 1:
            raise PredictorError(f"objects_per_batch must be at least 1, got {objects_per_batch}")
        self.objects_per_batch = objects_per_batch
        self.cfg = cfg
        self.teacher_cfg = cfg.MODEL.TEACHER
        self.seed = seed
        self.storage_dtype = storage_dtype
        self._trunk_params = trunk_params
        self._trunk = None
        self.timings: dict[str, float] = {}
        self.trace_counts: dict[str, int] = {}
        self._tracker_def, self._tracker_state = nnx.split(tracker)
        if student is None:
            self._memory_def, self._memory_state = None, None
        else:
            self._memory_def, self._memory_state = nnx.split(student)
        # The jit-compiled operations every frame runs (name -> function); tools that compile them
        # ahead of time for another device read and wrap them here (benchmarks/gpu_compile.py).
        self.operations = self._compile()

    # ----------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | None,
        *,
        config: config_lib.Config | str | Path | None = None,
        overrides: Sequence[str] = (),
        seed: int = 0,
        memory: str = "auto",
        objects_per_batch: int | None = None,
        storage_dtype: Any = jnp.bfloat16,
    ) -> VideoPredictor:
        """A predictor from any weights source `es3_jax.weights.load` reads (a sam3.pt, a merged
        export, an es3 weights folder, an `es3 train` run or checkpoint, ...), or None (random).

        config: a Config, a YAML path, or None (the source's own config, else the defaults);
        overrides: `KEY VALUE` pairs. memory: "teacher", "student" or "auto" (the student when
        the weights hold one, or, for random weights, when the config describes one).
        objects_per_batch, storage_dtype: see the constructor.
        """
        loaded = weights.load(path, config, overrides=overrides, seed=seed)
        cfg = loaded.cfg
        if memory == "auto":
            described = loaded.kind == "random" and _is_student_config(cfg)
            memory = "student" if loaded.student is not None or described else "teacher"
        params = loaded.tracker
        if memory == "teacher":
            if not loaded.has_teacher_memory:
                raise PredictorError(
                    f"{loaded.source}: holds no teacher memory attention (a merged export); use the student"
                )
        elif not loaded.has_teacher_memory:
            params = {**params, "memory_attention": _unused_memory_attention(cfg)}
        tracker = build_tracker(cfg.MODEL.TEACHER, params, source=loaded.source)
        student = student_from_config(cfg, loaded.student, seed=seed) if memory == "student" else None
        return cls(
            cfg,
            tracker,
            student=student,
            trunk_params=lambda: loaded.trunk_params(seed),
            seed=seed,
            storage_dtype=storage_dtype,
            objects_per_batch=objects_per_batch,
        )

    # ----------------------------------------------------------------------------------------
    # jit-compiled pieces (one trace per shape; counted in `trace_counts`)

    def _traced(self, name: str) -> None:
        self.trace_counts[name] = self.trace_counts.get(name, 0) + 1

    def _compile(self) -> dict:
        tdef, mdef = self._tracker_def, self._memory_def

        def models(tstate, mstate):
            tracker = nnx.merge(tdef, tstate)
            memory = tracker.memory_path() if mdef is None else nnx.merge(mdef, mstate)
            return tracker, memory

        def features(tstate, trunk_features):
            self._traced("features")
            return nnx.merge(tdef, tstate).frame_features(trunk_features)

        def step(tstate, mstate, frame, bank, sel):
            self._traced("track_step")
            tracker, memory = models(tstate, mstate)
            return tracker.track_step(memory, frame, bank, sel)

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

        def prompt_memory(tstate, mstate, frame, low_res, scores, prompted, top):
            self._traced("prompt_memory")
            tracker, memory = models(tstate, mstate)
            return tracker.prompt_memory(memory, frame, low_res, scores, prompted, top)

        return {
            "features": jax.jit(features),
            "step": jax.jit(step, donate_argnums=(3,)),
            "mask_prompt": jax.jit(mask_prompt),
            "click_prompt": jax.jit(click_prompt, static_argnums=(5,)),
            "prompt_top": jax.jit(prompt_top),
            "prompt_memory": jax.jit(prompt_memory),
        }

    def _timed(self, name: str, fn, *args):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        self.timings[name] = self.timings.get(name, 0.0) + 1000 * (time.perf_counter() - start)
        return out

    # ----------------------------------------------------------------------------------------
    # inputs

    @property
    def memory(self) -> str:
        """Whose memory path the steps run: "teacher" or "student"."""
        return "teacher" if self._memory_def is None else "student"

    def modules(self) -> tuple[SAM3Tracker, nnx.Module, nnx.Module]:
        """(tracker, the memory path its steps read: its own or the student, trunk): modules holding
        the predictor's weights, for an export to trace. The trunk is built here when no frame has
        needed it yet."""
        tracker = nnx.merge(self._tracker_def, self._tracker_state)
        memory = (
            tracker.memory_path()
            if self._memory_def is None
            else nnx.merge(self._memory_def, self._memory_state)
        )
        if self._trunk is None:
            self._build_trunk()
        _, tdef, tstate = self._trunk
        return tracker, memory, nnx.merge(tdef, tstate)

    def _build_trunk(self) -> None:
        params = None if self._trunk_params is None else self._trunk_params()
        tdef, tstate = nnx.split(trunk_from_config(self.cfg, params, seed=self.seed))

        @jax.jit
        def run(state, images):
            self._traced("trunk")
            return nnx.merge(tdef, state)(images)

        self._trunk = (run, tdef, tstate)

    def _run_trunk(self, images: np.ndarray) -> jax.Array:
        """Normalised frames `[1, S, S, 3]` -> trunk features, by the trunk built on first use."""
        if self._trunk is None:
            self._build_trunk()
        run, _, state = self._trunk
        return run(state, jnp.asarray(images))

    def init_state(
        self,
        video: Video,
        *,
        video_size: tuple[int, int] | None = None,
        offload_to_disk: bool = False,
    ) -> State:
        """A new inference state for a video.

        video: a folder of frames (sorted by integer stem); frames `[T, H, W, 3]` uint8; trunk
        features `[T, g, g, Ct]` float (then `video_size` gives the output size, default the
        model's image size); or `(EmbeddingStore, video id)` of pre-computed trunk features
        (output size from the store's metadata when it records one). `offload_to_disk` is
        accepted for API compatibility: the bank is bounded, so nothing grows to offload.
        """
        del offload_to_disk
        return State(open_video(video, self.cfg, self._run_trunk, self._timed, video_size))

    def init_stream(self, video_size: tuple[int, int] | None = None) -> State:
        """A new inference state for frames that arrive one at a time (a camera, a pipe).

        ```python
        state = predictor.init_stream()
        for image in camera:                       # [H, W, 3] uint8 RGB
            frame_idx = predictor.add_frame(state, image)
            if frame_idx == 0:                     # prompts go on the newest frame, any time
                predictor.add_new_mask(state, frame_idx, obj_id=1, mask=mask)
            _, obj_ids, logits = predictor.track_frame(state)    # [O, H, W] of that frame
        ```
        `track_frame(state, image)` adds the frame and tracks it in one call. The memory is that of
        `propagate_in_video` tracking forward, and bounded: it does not grow with the stream.
        video_size: (H, W) of the masks; default: the first frame's size.
        """
        return State(FrameStream.of_size(video_size))

    def add_frame(self, state: State, frame: np.ndarray) -> int:
        """The next frame of a stream: `[H, W, 3]` uint8 RGB (every frame of one size), or trunk
        features `[g, g, Ct]` float. Returns its index; earlier frames are let go."""
        stream = state.source
        if not isinstance(stream, FrameStream):
            raise PredictorError(
                "add_frame takes the frames of a stream (init_stream); this state holds a video"
            )
        frame = np.asarray(frame)
        t = self.teacher_cfg
        if frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[-1] == 3:
            stream.check_shape(frame.shape)
            data = self.cfg.DATA
            image = normalize(resize_frame(frame, t.IMAGE_SIZE), data.PIXEL_MEAN, data.PIXEL_STD)[None]
            features = self._timed("trunk", self._run_trunk, image)
            size = frame.shape[:2]
        elif frame.shape == (t.grid, t.grid, t.TRUNK_DIM) and np.issubdtype(frame.dtype, np.floating):
            features = jnp.asarray(frame[None], jnp.float32)
            size = (t.IMAGE_SIZE, t.IMAGE_SIZE)
        else:
            raise PredictorError(
                f"a stream frame must be [H, W, 3] uint8 or trunk features [{t.grid}, {t.grid}, "
                f"{t.TRUNK_DIM}] float, got {frame.dtype} {frame.shape}"
            )
        state.cached = None
        return stream.push(features, frame.shape, size)

    def track_frame(self, state: State, frame: np.ndarray | None = None) -> tuple[int, list[int], np.ndarray]:
        """The masks of a stream's newest frame (after adding `frame`, when given): (frame_idx,
        obj_ids, logits `[O, H, W]` float32 at video resolution; no object yet: `[0, H, W]`).

        Objects prompted on this frame get their prompts' masks and join the memory; the others
        prompted earlier are tracked. Each frame is tracked once.
        """
        stream = state.source
        if not isinstance(stream, FrameStream):
            raise PredictorError(
                "track_frame tracks a stream (init_stream); use propagate_in_video on a video"
            )
        if frame is not None:
            self.add_frame(state, frame)
        idx = stream.to_track()
        h, w = state.video_size
        o = state.num_objects
        logits = np.zeros((0, h, w), np.float32)
        if any(state.prompts.values()):
            t = self.teacher_cfg
            if state.memory is None:
                layout = BankLayout.for_video(t, 1)
                schedule = MemorySchedule(t, layout, None, o, policy=bank_policy(t))
                state.memory = Memory(schedule, self.objects_per_batch)
            elif state.memory.schedule.num_objects < o:
                state.memory.add_objects(o - state.memory.schedule.num_objects)
            out = self._frame_output(state, state.memory, state.prompts, idx, False, write_prompts=True)
            logits = self._video_logits(out.low_res, h, w)
        stream.tracked = True
        return idx, list(state.obj_ids), logits

    def reset_state(self, state: State) -> None:
        """Forget every object, prompt, memory and earlier pass of the state (the video stays)."""
        state.obj_ids.clear()
        state.prompts.clear()
        state.passes.clear()
        state.memory = None

    def _frame(self, state: State, idx: int) -> FrameFeatures:
        if not 0 <= idx < state.num_frames:
            raise PredictorError(f"frame index {idx} outside the video's {state.num_frames} frames")
        if state.cached is not None and state.cached[0] == idx:
            return state.cached[1]
        trunk = state.source.features(idx)
        frame = self._timed("neck", self.operations["features"], self._tracker_state, trunk)
        state.cached = (idx, frame)
        return frame

    def _obj_idx(self, state: State, obj_id: int) -> int:
        if obj_id not in state.obj_ids:
            state.obj_ids.append(obj_id)
            state.prompts[len(state.obj_ids) - 1] = {}
        return state.obj_ids.index(obj_id)

    # ----------------------------------------------------------------------------------------
    # prompts

    def _check_promptable(self, state: State, frame_idx: int) -> None:
        if isinstance(state.source, FrameStream):
            state.source.check_promptable(frame_idx)

    def _earlier_output(self, state: State, frame_idx: int) -> tuple[Pass, FrameOutput] | None:
        """The latest pass's output on `frame_idx`, when a pass tracked it and some object it tracked
        there has no prompt on it now: the pass is replayed up to that frame, once (the bank keeps
        no past frame, and its memories are what the pass computed, exactly)."""
        for p in reversed(state.passes):
            tracked = p.order[: p.done]
            if frame_idx not in tracked:
                continue
            if all(frame_idx in state.prompts[obj] for obj in range(p.num_objects)):
                return None
            if frame_idx not in p.replayed:
                order = tracked[: tracked.index(frame_idx) + 1]
                memory = self._pass_memory(state, p.prompts, p.num_objects)
                frames = self._track_frames(state, memory, p.prompts, order, p.reverse)
                ((_, p.replayed[frame_idx]),) = collections.deque(frames, maxlen=1)  # the last frame only
            return p, p.replayed[frame_idx]
        return None

    def _correct(
        self, state: State, frame_idx: int, obj: int, earlier: tuple[Pass, FrameOutput] | None
    ) -> None:
        """A prompt added on a frame an earlier pass tracked makes that frame a conditioning frame for
        every object tracked there: the others keep their output of that pass (as upstream
        consolidates them)."""
        if earlier is None:
            return
        p, out = earlier
        for other in range(p.num_objects):
            if other != obj and out.tracked[other] and frame_idx not in state.prompts[other]:
                state.prompts[other][frame_idx] = Prompt(
                    "tracked",
                    out.low_res[other],
                    None,
                    out.obj_ptr[other],
                    float(out.object_score[other]),
                    float(out.iou[other]),
                )

    def add_new_mask(
        self, state: State, frame_idx: int, obj_id: int, mask: np.ndarray
    ) -> tuple[int, list[int], np.ndarray]:
        """A mask prompt `[h, w]` (bool or [0, 1]; any size, resized as upstream) for one object.

        Returns (frame_idx, obj_ids, logits `[O, H, W]` of that frame at video resolution).
        Where it overlaps masks given earlier on this frame, the new mask wins. On a frame that
        `propagate_in_video` tracked, the other objects tracked there keep that output as their
        prompt on it (a correction; the next propagation conditions on it).
        """
        self._check_promptable(state, frame_idx)
        grid = self.teacher_cfg.grid
        m_in, logits = mask_inputs(mask, grid, state.video_size)
        obj = self._obj_idx(state, obj_id)
        frame = self._frame(state, frame_idx)
        earlier = self._earlier_output(state, frame_idx)
        out = self._timed(
            "prompt",
            self.operations["mask_prompt"],
            self._tracker_state,
            frame,
            jnp.asarray(m_in)[None, ..., None],
        )
        carve(state.prompts, frame_idx, obj, logits, grid)
        state.prompts[obj][frame_idx] = Prompt(
            "mask",
            low_res_of(logits, grid),
            logits,
            np.array(out.obj_ptr[0]),
            float(out.object_score_logits[0]),
            float(out.iou_score[0]),
        )
        self._correct(state, frame_idx, obj, earlier)
        return frame_idx, list(state.obj_ids), self._prompt_frame_logits(state, frame_idx)

    def add_new_points_or_box(
        self,
        state: State,
        frame_idx: int,
        obj_id: int,
        points: np.ndarray | Sequence | None = None,
        labels: np.ndarray | Sequence | None = None,
        box: np.ndarray | Sequence | None = None,
        clear_old_points: bool = True,
    ) -> tuple[int, list[int], np.ndarray]:
        """Clicks `[P, 2]` (x, y video pixels) with labels `[P]` (1 positive, 0 negative) and/or a
        box (x0, y0, x1, y1 video pixels) for one object on one frame.

        As upstream: a box goes first as two corner points; new clicks add to the frame's earlier
        ones unless `clear_old_points`; the object's previous logits on the frame (its clicks' or
        tracked output there) are fed back as a mask prompt; one click (or none) gives the best of
        3 masks, more give one mask. On a frame that `propagate_in_video` tracked, this is a
        correction: the tracked output is the previous logits, and the other objects tracked there
        keep theirs as their prompt on the frame.
        Returns (frame_idx, obj_ids, logits `[O, H, W]` of that frame at video resolution).
        """
        self._check_promptable(state, frame_idx)
        obj = self._obj_idx(state, obj_id)
        previous = state.prompts[obj].get(frame_idx)
        coords, labs = click_inputs(
            points,
            labels,
            box,
            image_size=self.teacher_cfg.IMAGE_SIZE,
            video_size=state.video_size,
            previous=previous,
            clear_old_points=clear_old_points,
        )
        frame = self._frame(state, frame_idx)
        earlier = self._earlier_output(state, frame_idx)
        prev = None
        if previous is not None and previous.kind in ("points", "tracked"):
            prev = jnp.asarray(previous.low_res)[None]
        elif (
            previous is None
            and earlier is not None
            and obj < earlier[0].num_objects
            and earlier[1].tracked[obj]
        ):
            prev = jnp.asarray(earlier[1].low_res[obj])[None]
        out = self._timed(
            "prompt",
            self.operations["click_prompt"],
            self._tracker_state,
            frame,
            jnp.asarray(coords)[None],
            jnp.asarray(labs)[None],
            prev,
            len(labs) <= 1,
        )
        state.prompts[obj][frame_idx] = Prompt(
            "points",
            np.array(out.low_res_masks[0]),
            None,
            np.array(out.obj_ptr[0]),
            float(out.object_score_logits[0]),
            float(out.iou_score[0]),
            coords,
            labs,
        )
        self._correct(state, frame_idx, obj, earlier)
        return frame_idx, list(state.obj_ids), self._prompt_frame_logits(state, frame_idx)

    def _prompt_frame_logits(self, state: State, frame_idx: int) -> np.ndarray:
        return frame_prompt_logits(state.prompts, frame_idx, state.num_objects, state.video_size)

    # ----------------------------------------------------------------------------------------
    # memory: one code path for passes, replays and streams

    def _pass_memory(self, state: State, prompts: Prompts, num_objects: int) -> Memory:
        """A fresh memory holding the memories of every prompted frame (a pass reads the
        conditioning frames ahead of it too, as upstream's preflight makes them)."""
        t = self.teacher_cfg
        most = max((len(f) for f in prompts.values()), default=1)
        layout = BankLayout.for_video(t, most)
        schedule = MemorySchedule(
            t, layout, state.num_frames, num_objects, policy=bank_policy(t)
        )
        memory = Memory(schedule, self.objects_per_batch)
        for f in sorted({f for frames in prompts.values() for f in frames}):
            self._write_prompts(state, memory, prompts, f)
        return memory

    def _write_prompts(self, state: State, memory: Memory, prompts: Prompts, f: int) -> None:
        """The memories of frame `f` for the objects prompted on it, written to their banks."""
        o = memory.schedule.num_objects
        prompted = np.array([f in prompts[obj] for obj in range(o)])
        if not prompted.any():
            return
        t = self.teacher_cfg
        low = np.full((o, 4 * t.grid, 4 * t.grid), NO_OBJ_SCORE, np.float32)
        scores = np.zeros((o,), np.float32)
        ptrs = np.zeros((o, t.D_MODEL), np.float32)
        slots = np.zeros((o,), np.int32)
        for obj in np.flatnonzero(prompted):
            p = prompts[obj][f]
            low[obj], scores[obj], ptrs[obj] = p.low_res, p.object_score, p.obj_ptr
            slots[obj], forgotten = memory.condition(obj, f)
            for old in forgotten:
                prompts[obj].pop(old, None)
        frame = self._frame(state, f)
        rows = memory.bank_rows
        batches = [(i, b) for i, b in enumerate(memory.batches()) if prompted[b.start : b.stop].any()]
        # Upstream keeps the prompted objects of a frame from overlapping in memory: per pixel the
        # top object over every batch keeps its mask.
        best = top = None
        for _, b in batches:
            b_best, b_top = self.operations["prompt_top"](
                self._tracker_state, jnp.asarray(_rows(low, b, rows, NO_OBJ_SCORE)), _rows(prompted, b, rows)
            )
            b_top = b_top + b.start
            if best is None:
                best, top = b_best, b_top
            else:
                ahead = b_best > best
                best, top = jnp.where(ahead, b_best, best), jnp.where(ahead, b_top, top)
        for i, b in batches:
            tokens, tokens_pos = self._timed(
                "prompt_memory",
                self.operations["prompt_memory"],
                self._tracker_state,
                self._memory_state,
                frame,
                jnp.asarray(_rows(low, b, rows, NO_OBJ_SCORE)),
                jnp.asarray(_rows(scores, b, rows)),
                jnp.asarray(_rows(prompted, b, rows)),
                top - b.start,
            )
            bank = memory.bank(i, tokens.shape[1:], t.D_MODEL, self.storage_dtype)
            slot = jnp.asarray(_rows(slots, b, rows))
            memory.banks[i] = bank.write(
                tokens,
                tokens_pos,
                jnp.asarray(_rows(ptrs, b, rows)),
                slot,
                slot,
                jnp.asarray(_rows(prompted, b, rows)),
            )

    def _frame_output(
        self, state: State, memory: Memory, prompts: Prompts, f: int, reverse: bool, *, write_prompts: bool
    ) -> FrameOutput:
        """Frame `f`: the prompted objects' prompts, the started ones tracked through memory (their
        memories written), the others NO_OBJ_SCORE. `write_prompts`: also write the prompted
        objects' memories now (a stream; a pass wrote them all before its first frame)."""
        t = self.teacher_cfg
        o = memory.schedule.num_objects
        low = np.full((o, 4 * t.grid, 4 * t.grid), NO_OBJ_SCORE, np.float32)
        ptrs = np.zeros((o, t.D_MODEL), np.float32)
        scores = np.zeros((o,), np.float32)
        ious = np.zeros((o,), np.float32)
        prompted = np.array([f in prompts[obj] for obj in range(o)])
        tracked = np.array([started(prompts[obj], f, reverse) for obj in range(o)]) & ~prompted
        for obj in np.flatnonzero(prompted):
            p = prompts[obj][f]
            low[obj], ptrs[obj], scores[obj], ious[obj] = p.low_res, p.obj_ptr, p.object_score, p.iou
        if write_prompts:
            self._write_prompts(state, memory, prompts, f)
        if tracked.any():
            frame = self._frame(state, f)
            reads = memory.schedule.select(f, reverse, tracked)
            presence = np.zeros((o,), np.float32)
            rows = memory.bank_rows
            for i, b in enumerate(memory.batches()):
                if not tracked[b.start : b.stop].any():
                    continue
                sel = Selection(
                    **{k: jnp.asarray(v if np.ndim(v) == 0 else _rows(v, b, rows)) for k, v in reads.items()}
                )
                out, memory.banks[i] = self._timed(
                    "track_step",
                    self.operations["step"],
                    self._tracker_state,
                    self._memory_state,
                    frame,
                    memory.banks[i],
                    sel,
                )
                rows_tracked = np.flatnonzero(tracked[b.start : b.stop])
                objs = rows_tracked + b.start
                low[objs] = np.asarray(out.low_res_masks)[rows_tracked]
                ptrs[objs] = np.asarray(out.obj_ptr)[rows_tracked]
                scores[objs] = np.asarray(out.object_score_logits)[rows_tracked]
                ious[objs] = np.asarray(out.iou_score)[rows_tracked]
                presence[objs] = np.asarray(out.presence)[rows_tracked]
            memory.schedule.record(f, reads, frame_score(presence, ious, tracked))
        self.timings["frames"] = self.timings.get("frames", 0) + 1
        return FrameOutput(low, ptrs, scores, ious, tracked)

    def _track_frames(
        self, state: State, memory: Memory, prompts: Prompts, order: Sequence[int], reverse: bool
    ) -> Iterator[tuple[int, FrameOutput]]:
        for f in order:
            yield f, self._frame_output(state, memory, prompts, f, reverse, write_prompts=False)

    def _video_logits(self, low_res: np.ndarray, h: int, w: int) -> np.ndarray:
        """Low-res logits `[O, 4g, 4g]` -> `[O, h, w]` at video resolution, a host array (a copy,
        never a view of a device buffer)."""
        start = time.perf_counter()
        logits = resize_bilinear(low_res, h, w)
        self.timings["resize"] = self.timings.get("resize", 0.0) + 1000 * (time.perf_counter() - start)
        return logits

    # ----------------------------------------------------------------------------------------
    # propagation

    def propagate_in_video(
        self,
        state: State,
        start_frame_idx: int | None = None,
        max_frame_num_to_track: int | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[int, list[int], np.ndarray]]:
        """Track every object from `start_frame_idx` (default: the first prompted frame), forward or
        in reverse, over `max_frame_num_to_track` more frames (default: to the end).

        Yields (frame_idx, obj_ids, logits `[O, H, W]` float32 at video resolution), one frame at a
        time; nothing is kept per frame. Prompted frames yield their prompts.
        """
        if state.is_stream:
            raise PredictorError("a stream is tracked frame by frame: track_frame")
        if not any(state.prompts.values()):
            raise PredictorError("no prompts: add a mask, points or a box first")
        num_frames = state.num_frames
        if start_frame_idx is None:
            start_frame_idx = min(f for frames in state.prompts.values() for f in frames)
        if max_frame_num_to_track is None:
            max_frame_num_to_track = num_frames
        if reverse:
            end = max(start_frame_idx - max_frame_num_to_track, 0)
            order = range(start_frame_idx, end - 1, -1) if start_frame_idx > 0 else [0]
        else:
            end = min(start_frame_idx + max_frame_num_to_track, num_frames - 1)
            order = range(start_frame_idx, end + 1)
        done = Pass(copy_prompts(state.prompts), state.num_objects, list(order), reverse)
        state.passes.append(done)
        state.memory = self._pass_memory(state, done.prompts, done.num_objects)
        h, w = state.video_size
        obj_ids = list(state.obj_ids)
        for frame_idx, out in self._track_frames(state, state.memory, done.prompts, done.order, reverse):
            done.done += 1
            yield frame_idx, obj_ids, self._video_logits(out.low_res, h, w)


def _is_student_config(cfg: config_lib.Config) -> bool:
    m = cfg.MODEL
    return (
        m.PERCEIVER.ENABLED
        or m.MEMORY_ATTENTION.POOL_SIZE > 1
        or m.MEMORY_ATTENTION.NUM_LAYERS != m.TEACHER.MEMORY_ATTENTION_LAYERS
    )


def _unused_memory_attention(cfg: config_lib.Config) -> dict:
    """Zeros in the teacher's memory-attention shapes: the tracker module holds them, the student's
    path never reads them."""
    prefix = "memory_attention."
    shapes = expected_param_shapes(cfg.MODEL.TEACHER)
    return unflatten(
        {p.removeprefix(prefix): np.zeros(s, np.float32) for p, s in shapes.items() if p.startswith(prefix)}
    )
