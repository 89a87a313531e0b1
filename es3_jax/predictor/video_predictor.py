"""`VideoPredictor`: the user-facing video tracking API, with SAM2/SAM3 predictor semantics.

```python
predictor = VideoPredictor.from_checkpoint("sam3.pt")
state = predictor.init_state("video_frames/")            # or frames [T,H,W,3] uint8, or (store, video)
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
  reverse after forward) does not read the first pass's tracked frames, as upstream would.
* Objects may join later (the SA-V / YouTube-VOS protocol). Add every prompt, on whatever frame
  the object first appears, before calling `propagate_in_video` once: an object is tracked from
  its first prompted frame on (in the direction of propagation), and its logits are
  `NO_OBJ_SCORE` before that. A frame is a conditioning frame only for the objects prompted on
  it; the other objects are tracked through it. With every object prompted on the same frames
  this is exactly upstream's batched behaviour.
* Points and boxes are in video pixels (x, y), as SAM2's predictor takes them.
"""

from __future__ import annotations

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
from es3_jax.errors import Es3Error
from es3_jax.models.memory_bank import MemoryBank, Selection
from es3_jax.models.sam_heads import NO_OBJ_SCORE
from es3_jax.models.student import student_from_config
from es3_jax.models.tracker import FrameFeatures, SAM3Tracker, build_tracker, expected_param_shapes
from es3_jax.models.trunk import trunk_from_config
from es3_jax.nn.layers import resize_bilinear
from es3_jax.params import unflatten
from es3_jax.predictor.frame_sources import FrameSource, Video, open_video
from es3_jax.predictor.schedule import BankLayout, MemorySchedule


class PredictorError(Es3Error):
    """A call the predictor cannot honour (bad prompt, unknown object, missing input); says why."""


# Upstream keeps only the first 8 and the last 8 clicks of a long click sequence.
_MAX_POINTS = 16


@dataclasses.dataclass
class Prompt:
    """One object's prompt on one frame and what the SAM heads made of it."""

    kind: str  # "mask" or "points"
    low_res: np.ndarray  # [4g, 4g] consolidated logits (what the frame's memory is encoded from)
    video_res: np.ndarray | None  # [H, W] logits ±1024 for masks (carved by later masks), else None
    obj_ptr: jax.Array  # [C]
    object_score: float
    iou: float
    coords: np.ndarray | None = None  # [P, 2] input-image pixels
    labels: np.ndarray | None = None  # [P]


@dataclasses.dataclass
class State:
    """An inference state: the video source, the prompts, and the bounded memory bank."""

    source: FrameSource
    obj_ids: list[int] = dataclasses.field(default_factory=list)
    prompts: dict[int, dict[int, Prompt]] = dataclasses.field(
        default_factory=dict
    )  # obj idx -> frame -> prompt
    bank: MemoryBank | None = None
    schedule: MemorySchedule | None = None
    cached: tuple[int, FrameFeatures] | None = None

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
    ):
        """trunk_params: gives the trunk's parameters when frames (not features) are tracked; None
        draws a random trunk from `seed`."""
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
        self._jit = self._compile()

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
    ) -> VideoPredictor:
        """A predictor from any weights source `es3_jax.weights.load` reads (a sam3.pt, a merged
        export, an es3 weights folder, an `es3 train` run or checkpoint, ...), or None (random).

        config: a Config, a YAML path, or None (the source's own config, else the defaults);
        overrides: `KEY VALUE` pairs. memory: "teacher", "student" or "auto" (the student when
        the weights hold one, or, for random weights, when the config describes one).
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
        return cls(cfg, tracker, student=student, trunk_params=lambda: loaded.trunk_params(seed), seed=seed)

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

        def prompt_memory(tstate, mstate, frame, low_res, scores, prompted):
            self._traced("prompt_memory")
            tracker, memory = models(tstate, mstate)
            return tracker.prompt_memory(memory, frame, low_res, scores, prompted)

        def resize(x, height, width, antialias):
            self._traced("resize")
            return resize_bilinear(x, height, width, antialias=antialias)

        return {
            "features": jax.jit(features),
            "step": jax.jit(step, donate_argnums=(3,)),
            "mask_prompt": jax.jit(mask_prompt),
            "click_prompt": jax.jit(click_prompt, static_argnums=(5,)),
            "prompt_memory": jax.jit(prompt_memory),
            "resize": jax.jit(resize, static_argnums=(1, 2, 3)),
        }

    def _timed(self, name: str, fn, *args):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        self.timings[name] = self.timings.get(name, 0.0) + 1000 * (time.perf_counter() - start)
        return out

    def _resize(
        self, x: np.ndarray | jax.Array, height: int, width: int, antialias: bool = False
    ) -> np.ndarray:
        """`[O, h, w]` -> `[O, height, width]` float32 (bilinear, half-pixel; antialiased when asked and shrinking)."""
        x = jnp.asarray(x, jnp.float32)
        if x.shape[-2:] == (height, width):
            return np.asarray(x)
        return np.asarray(self._jit["resize"](x[..., None], height, width, antialias)[..., 0])

    # ----------------------------------------------------------------------------------------
    # inputs

    def _run_trunk(self, images: np.ndarray) -> jax.Array:
        """Normalised frames `[1, S, S, 3]` -> trunk features, by the trunk built on first use."""
        if self._trunk is None:
            params = None if self._trunk_params is None else self._trunk_params()
            trunk = trunk_from_config(self.cfg, params, seed=self.seed)
            tdef, tstate = nnx.split(trunk)

            @jax.jit
            def run(state, images):
                self._traced("trunk")
                return nnx.merge(tdef, state)(images)

            self._trunk = (run, tstate)
        run, state = self._trunk
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

    def reset_state(self, state: State) -> None:
        """Forget every object, prompt and memory of the state (the video stays)."""
        state.obj_ids.clear()
        state.prompts.clear()
        state.bank = None
        state.schedule = None

    def _frame(self, state: State, idx: int) -> FrameFeatures:
        if not 0 <= idx < state.num_frames:
            raise PredictorError(f"frame index {idx} outside the video's {state.num_frames} frames")
        if state.cached is not None and state.cached[0] == idx:
            return state.cached[1]
        trunk = state.source.features(idx)
        frame = self._timed("neck", self._jit["features"], self._tracker_state, trunk)
        state.cached = (idx, frame)
        return frame

    def _obj_idx(self, state: State, obj_id: int) -> int:
        if obj_id not in state.obj_ids:
            state.obj_ids.append(obj_id)
            state.prompts[len(state.obj_ids) - 1] = {}
        return state.obj_ids.index(obj_id)

    # ----------------------------------------------------------------------------------------
    # prompts

    def add_new_mask(
        self, state: State, frame_idx: int, obj_id: int, mask: np.ndarray
    ) -> tuple[int, list[int], np.ndarray]:
        """A mask prompt `[h, w]` (bool or [0, 1]; any size, resized as upstream) for one object.

        Returns (frame_idx, obj_ids, logits `[O, H, W]` of that frame at video resolution).
        Where it overlaps masks given earlier on this frame, the new mask wins.
        """
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise PredictorError(f"a mask prompt must be [H, W], got shape {mask.shape}")
        obj = self._obj_idx(state, obj_id)
        frame = self._frame(state, frame_idx)
        s = 16 * self.teacher_cfg.grid
        h, w = state.video_size
        m = jnp.asarray(mask, jnp.float32)[None]
        m_in = self._resize(m, s, s, antialias=True)
        video_res = self._resize(m, h, w, antialias=True)[0] > 0.5
        out = self._timed(
            "prompt", self._jit["mask_prompt"], self._tracker_state, frame, jnp.asarray(m_in)[..., None]
        )
        logits = np.where(video_res, -NO_OBJ_SCORE, NO_OBJ_SCORE).astype(np.float32)
        for other, frames in state.prompts.items():
            p = frames.get(frame_idx)
            if other != obj and p is not None and p.video_res is not None:
                p.video_res = np.where(video_res, NO_OBJ_SCORE, p.video_res).astype(np.float32)
                p.low_res = self._low_res_of(p.video_res)
        state.prompts[obj][frame_idx] = Prompt(
            "mask",
            self._low_res_of(logits),
            logits,
            out.obj_ptr[0],
            float(out.object_score_logits[0]),
            float(out.iou_score[0]),
        )
        return frame_idx, list(state.obj_ids), self._prompt_frame_logits(state, frame_idx)

    def _low_res_of(self, video_res: np.ndarray) -> np.ndarray:
        low = 4 * self.teacher_cfg.grid
        return self._resize(video_res[None], low, low, antialias=True)[0]

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
        ones unless `clear_old_points`; the object's previous logits on the frame are fed back as
        a mask prompt; one click (or none) gives the best of 3 masks, more give one mask.
        Returns (frame_idx, obj_ids, logits `[O, H, W]` of that frame at video resolution).
        """
        if (points is None) != (labels is None):
            raise PredictorError("points and labels must be given together")
        if points is None and box is None:
            raise PredictorError("give points (with labels) or a box")
        if box is not None and not clear_old_points:
            raise PredictorError("a box must come first: use clear_old_points=True with a box")
        obj = self._obj_idx(state, obj_id)
        h, w = state.video_size
        scale = np.array([self.teacher_cfg.IMAGE_SIZE / w, self.teacher_cfg.IMAGE_SIZE / h], np.float32)
        coords = (
            np.zeros((0, 2), np.float32) if points is None else np.asarray(points, np.float32).reshape(-1, 2)
        )
        labs = np.zeros((0,), np.int32) if labels is None else np.asarray(labels, np.int32).reshape(-1)
        if len(coords) != len(labs):
            raise PredictorError(f"{len(coords)} points but {len(labs)} labels")
        coords = coords * scale
        if box is not None:
            corners = np.asarray(box, np.float32).reshape(2, 2) * scale
            coords = np.concatenate([corners, coords])
            labs = np.concatenate([np.array([2, 3], np.int32), labs])
        previous = state.prompts[obj].get(frame_idx)
        if not clear_old_points and previous is not None and previous.coords is not None:
            coords = np.concatenate([previous.coords, coords])
            labs = np.concatenate([previous.labels, labs])
        if len(coords) > _MAX_POINTS:
            keep = np.r_[0 : _MAX_POINTS // 2, len(coords) - (_MAX_POINTS - _MAX_POINTS // 2) : len(coords)]
            coords, labs = coords[keep], labs[keep]
        frame = self._frame(state, frame_idx)
        prev = None
        if previous is not None and previous.kind == "points":
            prev = jnp.asarray(previous.low_res)[None]
        out = self._timed(
            "prompt",
            self._jit["click_prompt"],
            self._tracker_state,
            frame,
            jnp.asarray(coords)[None],
            jnp.asarray(labs)[None],
            prev,
            len(labs) <= 1,
        )
        state.prompts[obj][frame_idx] = Prompt(
            "points",
            np.asarray(out.low_res_masks[0]),
            None,
            out.obj_ptr[0],
            float(out.object_score_logits[0]),
            float(out.iou_score[0]),
            coords,
            labs,
        )
        return frame_idx, list(state.obj_ids), self._prompt_frame_logits(state, frame_idx)

    def _prompt_frame_logits(self, state: State, frame_idx: int) -> np.ndarray:
        """Every object's prompt on a frame at video resolution (NO_OBJ_SCORE where it has none)."""
        h, w = state.video_size
        out = np.full((state.num_objects, h, w), NO_OBJ_SCORE, np.float32)
        for obj, frames in state.prompts.items():
            p = frames.get(frame_idx)
            if p is None:
                continue
            out[obj] = p.video_res if p.video_res is not None else self._resize(p.low_res[None], h, w)[0]
        return out

    # ----------------------------------------------------------------------------------------
    # propagation

    def _preflight(self, state: State) -> None:
        """A fresh bank and schedule holding the memories of every prompted frame."""
        if not any(state.prompts.values()):
            raise PredictorError("no prompts: add a mask, points or a box first")
        o = state.num_objects
        t = self.teacher_cfg
        most = max((len(f) for f in state.prompts.values()), default=1)
        layout = BankLayout.for_video(t, most)
        schedule = MemorySchedule(t, layout, state.num_frames, o, memory_selection=t.USE_MEMORY_SELECTION)
        g, d = t.grid, t.D_MODEL
        bank = None
        for f in sorted({f for frames in state.prompts.values() for f in frames}):
            frame = self._frame(state, f)
            low = np.full((o, 4 * g, 4 * g), NO_OBJ_SCORE, np.float32)
            scores = np.zeros((o,), np.float32)
            prompted = np.zeros((o,), bool)
            ptrs = jnp.zeros((o, d), jnp.float32)
            slots = np.zeros((o,), np.int32)
            for obj in range(o):
                p = state.prompts[obj].get(f)
                if p is not None:
                    low[obj], scores[obj], prompted[obj] = p.low_res, p.object_score, True
                    ptrs = ptrs.at[obj].set(p.obj_ptr)
                    slots[obj] = schedule.condition(obj, f)
            tokens, tokens_pos = self._timed(
                "prompt_memory",
                self._jit["prompt_memory"],
                self._tracker_state,
                self._memory_state,
                frame,
                jnp.asarray(low),
                jnp.asarray(scores),
                jnp.asarray(prompted),
            )
            if bank is None:
                bank = MemoryBank.empty(
                    o, layout.slots, layout.pointer_slots, tokens.shape[1:], d, self.storage_dtype
                )
            slots = jnp.asarray(slots)
            bank = bank.write(tokens, tokens_pos, ptrs, slots, slots, jnp.asarray(prompted))
        state.bank, state.schedule = bank, schedule

    def _started(self, state: State, obj: int, frame: int, reverse: bool) -> bool:
        frames = state.prompts[obj]
        return any((f >= frame) if reverse else (f <= frame) for f in frames)

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
        self._preflight(state)
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
        o = state.num_objects
        h, w = state.video_size
        low = 4 * self.teacher_cfg.grid
        for frame_idx in order:
            prompted = np.array([frame_idx in state.prompts[obj] for obj in range(o)])
            started = np.array([self._started(state, obj, frame_idx, reverse) for obj in range(o)])
            tracked = started & ~prompted
            low_res = np.full((o, low, low), NO_OBJ_SCORE, np.float32)
            for obj in np.flatnonzero(prompted):
                low_res[obj] = state.prompts[obj][frame_idx].low_res
            if tracked.any():
                frame = self._frame(state, frame_idx)
                reads = state.schedule.select(frame_idx, reverse, tracked)
                sel = Selection(**{k: jnp.asarray(v) for k, v in reads.items()})
                out, state.bank = self._timed(
                    "track_step",
                    self._jit["step"],
                    self._tracker_state,
                    self._memory_state,
                    frame,
                    state.bank,
                    sel,
                )
                step_low = np.asarray(out.low_res_masks)
                # Upstream `cal_mem_score` multiplies a [B, 1] by a [B] tensor before its mean, so
                # the frame's score is mean(presence) · mean(IoU), not the mean of the products.
                score = float(
                    np.mean(np.asarray(out.presence)[tracked]) * np.mean(np.asarray(out.iou_score)[tracked])
                )
                state.schedule.record(frame_idx, reads, score)
                low_res[tracked] = step_low[tracked]
            self.timings["frames"] = self.timings.get("frames", 0) + 1
            start = time.perf_counter()
            logits = self._resize(low_res, h, w)
            self.timings["resize"] = self.timings.get("resize", 0.0) + 1000 * (time.perf_counter() - start)
            yield frame_idx, list(state.obj_ids), logits


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
