"""`TrackingSession`: the SAM2/SAM3 predictor API over any `Engine`, all of it host code.

Prompts, the frame stream, the bounded memory bank and its schedule, corrections and objects in
batches are decided here, once, for every engine; the engine only computes
(`es3_jax.predictor.engine`). `VideoPredictor` is this session over the JAX engine, `OnnxTracker`
over an ONNX export. Plain numpy: the ONNX driver imports it without jax.

Memory is bounded: a state holds a fixed-size bank, the prompted frames' memories plus the few
recent frames a step can still read (which ones: the bank policy, `es3_jax.memory.policy`).
A pass reads the conditioning frames ahead of it too, as upstream's does; a stream cannot, so a
streamed frame's masks are those of `propagate_in_video` only while no object tracked through it
is prompted on a later frame.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from es3_jax.config import TrackerConfig
from es3_jax.interpolation import resize_bilinear
from es3_jax.logits import NO_OBJ_SCORE
from es3_jax.memory.policy import bank_policy
from es3_jax.memory.schedule import BankLayout, MemorySchedule, frame_score
from es3_jax.predictor.engine import Engine
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
    (the engine's) per batch of `rows` objects (rows None: all objects in one bank, which grows as
    they join)."""

    schedule: MemorySchedule
    rows: int | None
    banks: list[Any] = dataclasses.field(default_factory=list)

    @property
    def bank_rows(self) -> int:
        return self.rows or self.schedule.num_objects

    def batches(self) -> list[range]:
        """The objects of each bank."""
        o, rows = self.schedule.num_objects, self.bank_rows
        return [range(s, min(s + rows, o)) for s in range(0, o, rows)]

    def bank(self, engine: Engine, i: int) -> Any:
        """Bank `i`, made (zeroed) on first use."""
        while len(self.banks) <= i:
            self.banks.append(engine.new_bank(self.bank_rows, self.schedule.layout))
        return self.banks[i]

    def add_objects(self, engine: Engine, count: int) -> None:
        self.schedule.add_objects(count)
        if self.rows is None and self.banks:
            self.banks[0] = engine.grow_bank(self.banks[0], self.schedule.num_objects, 0, 0)


@dataclasses.dataclass
class State:
    """An inference state: the video (or stream), the prompts, and the bounded memory.

    source: a frame source (`es3_jax.predictor.frame_sources`: `num_frames`, `video_size`,
    `features(i)`) or a `FrameStream`.
    """

    source: Any
    obj_ids: list[int] = dataclasses.field(default_factory=list)
    prompts: Prompts = dataclasses.field(default_factory=dict)
    memory: Memory | None = None
    cached: tuple[int, Any] | None = None  # (frame index, the engine's frame)
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


class TrackingSession:
    """Tracks objects through videos and streams by driving `engine`; `cfg`: the tracker's config
    (image size, grid, pointer width, bank policy)."""

    def __init__(self, engine: Engine, cfg: TrackerConfig):
        self.engine = engine
        self.teacher_cfg = cfg
        self.timings = engine.timings

    # ----------------------------------------------------------------------------------------
    # states and frames

    def init_stream(self, video_size: tuple[int, int] | None = None) -> State:
        """A new inference state for frames that arrive one at a time (a camera, a pipe).

        ```python
        state = session.init_stream()
        for image in camera:                       # [H, W, 3] uint8 RGB
            frame_idx = session.add_frame(state, image)
            if frame_idx == 0:                     # prompts go on the newest frame, any time
                session.add_new_mask(state, frame_idx, obj_id=1, mask=mask)
            _, obj_ids, logits = session.track_frame(state)    # [O, H, W] of that frame
        ```
        `track_frame(state, image)` adds the frame and tracks it in one call. The memory is that of
        `propagate_in_video` tracking forward, and bounded: it does not grow with the stream.
        video_size: (H, W) of the masks; default: the first frame's size.
        """
        return State(FrameStream.of_size(video_size))

    def add_frame(self, state: State, frame: np.ndarray) -> int:
        """The next frame of a stream: `[H, W, 3]` uint8 RGB (every frame of one size), or what
        else the engine takes. Returns its index; earlier frames are let go."""
        stream = state.source
        if not isinstance(stream, FrameStream):
            raise PredictorError(
                "add_frame takes the frames of a stream (init_stream); this state holds a video"
            )
        frame = np.asarray(frame)
        stream.check_shape(frame.shape)
        kept, size = self.engine.stream_frame(frame)
        state.cached = None
        return stream.push(kept, frame.shape, size)

    def _frame(self, state: State, idx: int) -> Any:
        if not 0 <= idx < state.num_frames:
            raise PredictorError(f"frame index {idx} outside the video's {state.num_frames} frames")
        if state.cached is not None and state.cached[0] == idx:
            return state.cached[1]
        frame = self.engine.frame(state.source.features(idx))
        state.cached = (idx, frame)
        return frame

    def reset_state(self, state: State) -> None:
        """Forget every object, prompt, memory and earlier pass of the state (its frames stay)."""
        state.obj_ids.clear()
        state.prompts.clear()
        state.passes.clear()
        state.memory = None

    # ----------------------------------------------------------------------------------------
    # prompts

    def _known(self, state: State, obj_id: int) -> int | None:
        """Object `obj_id`'s index, None for a new object, which the engine must have room for."""
        if obj_id in state.obj_ids:
            return state.obj_ids.index(obj_id)
        limits = self.engine.limits
        if limits.objects is not None and state.num_objects >= limits.objects:
            raise PredictorError(
                f"object {obj_id}: {limits.name} tracks {limits.objects} objects ({state.obj_ids}); "
                f"{limits.remedy('objects')}"
            )
        return None

    def _obj_idx(self, state: State, obj_id: int) -> int:
        if obj_id not in state.obj_ids:
            state.obj_ids.append(obj_id)
            state.prompts[len(state.obj_ids) - 1] = {}
        return state.obj_ids.index(obj_id)

    def _check_promptable(self, state: State, frame_idx: int) -> None:
        if isinstance(state.source, FrameStream):
            state.source.check_promptable(frame_idx)

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
        self._known(state, obj_id)
        frame = self._frame(state, frame_idx)
        earlier = self._earlier_output(state, frame_idx)
        heads = self.engine.mask_prompt(frame, m_in)
        obj = self._obj_idx(state, obj_id)
        carve(state.prompts, frame_idx, obj, logits, grid)
        state.prompts[obj][frame_idx] = Prompt(
            "mask",
            low_res_of(logits, grid),
            logits,
            heads.obj_ptr[0],
            float(heads.object_score[0]),
            float(heads.iou[0]),
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
        obj = self._known(state, obj_id)
        previous = None if obj is None else state.prompts[obj].get(frame_idx)
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
            prev = previous.low_res
        elif previous is None and earlier is not None and obj is not None:
            p, out = earlier
            if obj < p.num_objects and out.tracked[obj]:
                prev = out.low_res[obj]
        limits = self.engine.limits
        if prev is not None and not limits.refines_clicks:
            raise PredictorError(
                f"object {obj_id} has clicks on frame {frame_idx} already: refining them needs its "
                f"previous logits as a mask input, which {limits.name} does not take; "
                f"{limits.remedy('refines_clicks')}"
            )
        heads = self.engine.click_prompt(frame, coords, labs, prev, len(labs) <= 1)
        obj = self._obj_idx(state, obj_id)
        state.prompts[obj][frame_idx] = Prompt(
            "points",
            heads.low_res[0],
            None,
            heads.obj_ptr[0],
            float(heads.object_score[0]),
            float(heads.iou[0]),
            coords,
            labs,
        )
        self._correct(state, frame_idx, obj, earlier)
        return frame_idx, list(state.obj_ids), self._prompt_frame_logits(state, frame_idx)

    def _prompt_frame_logits(self, state: State, frame_idx: int) -> np.ndarray:
        return frame_prompt_logits(state.prompts, frame_idx, state.num_objects, state.video_size)

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

    # ----------------------------------------------------------------------------------------
    # memory: one code path for passes, replays and streams

    def _new_memory(self, num_frames: int | None, num_objects: int, most_prompted: int) -> Memory:
        t, limits = self.teacher_cfg, self.engine.limits
        layout = limits.layout or BankLayout.for_video(t, most_prompted)
        schedule = MemorySchedule(t, layout, num_frames, num_objects, policy=bank_policy(t))
        return Memory(schedule, limits.bank_rows)

    def _pass_memory(self, state: State, prompts: Prompts, num_objects: int) -> Memory:
        """A fresh memory holding the memories of every prompted frame (a pass reads the
        conditioning frames ahead of it too, as upstream's preflight makes them)."""
        most = max((len(f) for f in prompts.values()), default=1)
        memory = self._new_memory(state.num_frames, num_objects, most)
        for f in sorted({f for frames in prompts.values() for f in frames}):
            self._write_prompts(state, memory, prompts, f)
        return memory

    def _condition(self, state: State, memory: Memory, obj: int, frame: int) -> int:
        """A conditioning slot for `obj`'s prompt on `frame`. A stream frees the slots no later frame
        reads (and forgets those prompts); where that is not enough (many prompts within a few
        frames), every bank gets 4 more conditioning slots, where the engine can grow them."""
        schedule = memory.schedule
        if schedule.needs_slot(obj, frame):
            if schedule.num_frames is None:
                for old in schedule.forget_cond(obj, frame):
                    state.prompts[obj].pop(old, None)
            if schedule.needs_slot(obj, frame):
                limits = self.engine.limits
                cond = schedule.layout.cond
                if limits.layout is not None:
                    raise PredictorError(
                        f"object {state.obj_ids[obj]}: prompts on more than {cond} frames that the "
                        f"memory still reads; {limits.remedy('cond_slots')}"
                    )
                schedule.layout = schedule.layout.with_cond(cond + 4)
                memory.banks = [self.engine.grow_bank(b, memory.bank_rows, 4, cond) for b in memory.banks]
        return schedule.condition(obj, frame)

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
            slots[obj] = self._condition(state, memory, obj, f)
        frame = self._frame(state, f)
        rows = memory.bank_rows
        batches = [(i, b) for i, b in enumerate(memory.batches()) if prompted[b.start : b.stop].any()]
        # Upstream keeps the prompted objects of a frame from overlapping in memory: per pixel the
        # top object over every batch keeps its mask.
        top = None
        if len(memory.batches()) > 1:
            best = None
            for _, b in batches:
                b_best, b_top = self.engine.prompt_top(
                    frame, _rows(low, b, rows, NO_OBJ_SCORE), _rows(prompted, b, rows)
                )
                b_top = b_top + b.start
                if best is None:
                    best, top = b_best, b_top
                else:
                    ahead = b_best > best
                    best, top = np.where(ahead, b_best, best), np.where(ahead, b_top, top)
        for i, b in batches:
            memory.banks[i] = self.engine.prompt_memory(
                frame,
                memory.bank(self.engine, i),
                _rows(low, b, rows, NO_OBJ_SCORE),
                _rows(scores, b, rows),
                _rows(ptrs, b, rows),
                _rows(prompted, b, rows),
                _rows(slots, b, rows),
                None if top is None else top - b.start,
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
                batch_reads = {k: v if np.ndim(v) == 0 else _rows(v, b, rows) for k, v in reads.items()}
                heads, memory.banks[i] = self.engine.track_step(
                    frame, memory.bank(self.engine, i), batch_reads
                )
                rows_tracked = np.flatnonzero(tracked[b.start : b.stop])
                objs = rows_tracked + b.start
                low[objs] = heads.low_res[rows_tracked]
                ptrs[objs] = heads.obj_ptr[rows_tracked]
                scores[objs] = heads.object_score[rows_tracked]
                ious[objs] = heads.iou[rows_tracked]
                presence[objs] = heads.presence[rows_tracked]
            memory.schedule.record(f, reads, frame_score(presence, ious, tracked))
        self.timings["frames"] = self.timings.get("frames", 0) + 1
        return FrameOutput(low, ptrs, scores, ious, tracked)

    def _track_frames(
        self, state: State, memory: Memory, prompts: Prompts, order: Sequence[int], reverse: bool
    ) -> Iterator[tuple[int, FrameOutput]]:
        for f in order:
            yield f, self._frame_output(state, memory, prompts, f, reverse, write_prompts=False)

    def _video_logits(self, low_res: np.ndarray, h: int, w: int) -> np.ndarray:
        """Low-res logits `[O, 4g, 4g]` -> `[O, h, w]` at video resolution, a host array."""
        start = time.perf_counter()
        logits = resize_bilinear(low_res, h, w)
        self.timings["resize"] = self.timings.get("resize", 0.0) + 1000 * (time.perf_counter() - start)
        return logits

    # ----------------------------------------------------------------------------------------
    # tracking

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
            if state.memory is None:
                state.memory = self._new_memory(None, o, 1)
            elif state.memory.schedule.num_objects < o:
                state.memory.add_objects(self.engine, o - state.memory.schedule.num_objects)
            out = self._frame_output(state, state.memory, state.prompts, idx, False, write_prompts=True)
            logits = self._video_logits(out.low_res, h, w)
        stream.tracked = True
        return idx, list(state.obj_ids), logits

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
