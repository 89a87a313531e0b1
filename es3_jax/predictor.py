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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from es3_jax import config as config_lib
from es3_jax.errors import Es3Error
from es3_jax.models import tracker as tracker_lib
from es3_jax.models.memory_path import RawMemory
from es3_jax.models.sam_heads import NO_OBJ_SCORE
from es3_jax.nn.layers import resize_bilinear


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
class _Entry:
    """A tracked (non-conditioning) frame of one object, as long as some future step may read it."""

    frame: int
    score: float
    slot: int | None  # spatial slot in the bank, None once only its pointer is needed
    pointer_slot: int


@dataclasses.dataclass
class State:
    """An inference state: the video source, the prompts, and the bounded memory bank."""

    num_frames: int
    video_size: tuple[int, int]  # (H, W) of the output masks
    source: Any  # _FrameSource
    obj_ids: list[int] = dataclasses.field(default_factory=list)
    prompts: dict[int, dict[int, Prompt]] = dataclasses.field(
        default_factory=dict
    )  # obj idx -> frame -> prompt
    bank: tracker_lib.MemoryBank | None = None
    cond_slots: list[dict[int, tuple[int, int]]] = dataclasses.field(default_factory=list)
    entries: list[list[_Entry]] = dataclasses.field(default_factory=list)
    cached: tuple[int, tracker_lib.FrameFeatures] | None = None

    @property
    def num_objects(self) -> int:
        return len(self.obj_ids)


class _FrameSource:
    """Per-frame trunk features `[1, g, g, Ct]` from an array, a frame folder/array, or a store."""

    def __init__(self, num_frames: int, get):
        self.num_frames = num_frames
        self.get = get


def _select_closest_cond(frame: int, cond: Sequence[int], max_num: int) -> tuple[list[int], list[int]]:
    """Upstream `select_closest_cond_frames`: the nearest before, the nearest at/after, then by |Δt|."""
    cond = sorted(cond)
    if max_num == -1 or len(cond) <= max_num:
        return cond, []
    selected = []
    before = [t for t in cond if t < frame]
    after = [t for t in cond if t >= frame]
    if before:
        selected.append(max(before))
    if after:
        selected.append(min(after))
    rest = sorted((t for t in cond if t not in selected), key=lambda t: abs(t - frame))
    selected += rest[: max_num - len(selected)]
    return selected, [t for t in cond if t not in selected]


class VideoPredictor:
    """Tracks objects through a video with the SAM3 tracker (teacher) or a distilled student."""

    def __init__(
        self,
        cfg: config_lib.Config,
        tracker: tracker_lib.SAM3Tracker,
        *,
        student: nnx.Module | None = None,
        trunk_params: dict | None = None,
        seed: int = 0,
        storage_dtype: Any = jnp.bfloat16,
    ):
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
        """A predictor from a `sam3.pt`, a merged export (`es3 export`: its recorded student), an es3
        weights folder (`es3 port` output, or the `weights/` an `es3 train` run writes; the run
        folder itself also works), or None (random).

        config: a Config, a YAML path, or None (the weights folder's config, else the defaults);
        overrides: `KEY VALUE` pairs. memory: "teacher", "student" or "auto" (the student when
        the weights hold one, or, for random weights, when the config describes one).
        """
        from es3_jax.models.tracker import SAM3Tracker, build_tracker, expected_param_shapes

        if isinstance(config, config_lib.Config):
            cfg = config_lib.apply_overrides(config, overrides)
        else:
            cfg = config_lib.load(config, overrides)
        student_params = trunk_params = None
        if path is None:
            tracker = SAM3Tracker(cfg.MODEL.TEACHER, rngs=nnx.Rngs(seed))
            use_student = memory == "student" or (memory == "auto" and _is_student_config(cfg))
        else:
            path = Path(path)
            if not path.exists():
                raise PredictorError(f"checkpoint not found: {path}")
            if (path / "weights").is_dir() and not (path / "params").exists():
                path = path / "weights"  # an `es3 train` run folder: the weights it wrote at the end
            if path.is_dir():
                from es3_jax import tracker_weights

                params, folder_cfg = tracker_weights.load(path)
                if config is None:
                    cfg = config_lib.apply_overrides(folder_cfg, overrides)
                student_params = params.pop("student", None)
                trunk_params = params.pop("trunk", None)
            elif _is_merged_export(path):
                from porting.export import port_merged

                # The file's record describes its student; a given config only supplies the rest.
                params, cfg, _ = port_merged(path, cfg if config is not None else None)
                cfg = config_lib.apply_overrides(cfg, overrides)
                student_params = params.pop("student", None)
                trunk_params = _try_port_trunk(path)
            else:
                from porting.sam3_checkpoint import port_checkpoint

                params = port_checkpoint(path, expected=expected_param_shapes(cfg.MODEL.TEACHER)).params
                trunk_params = _try_port_trunk(path)
            use_student = memory == "student" or (memory == "auto" and student_params is not None)
            if "memory_attention" not in params:
                # A merged export replaced the teacher's memory attention by the student's.
                if not use_student:
                    raise PredictorError(
                        f"{path}: holds no teacher memory attention (a merged export); use the student"
                    )
                params = {**params, "memory_attention": _unused_memory_attention(cfg)}
            tracker = build_tracker(cfg.MODEL.TEACHER, params, source=str(path))
        student = None
        if use_student:
            from es3_jax.models.student import student_from_config

            student = student_from_config(cfg, student_params, seed=seed)
        return cls(cfg, tracker, student=student, trunk_params=trunk_params, seed=seed)

    # ----------------------------------------------------------------------------------------
    # jit-compiled pieces (one trace per shape; counted in `trace_counts`)

    def _traced(self, name: str) -> None:
        self.trace_counts[name] = self.trace_counts.get(name, 0) + 1

    def _compile(self) -> dict:
        tdef, mdef = self._tracker_def, self._memory_def

        def models(tstate, mstate):
            tracker = nnx.merge(tdef, tstate)
            memory = RawMemory(tracker.memory_attention) if mdef is None else nnx.merge(mdef, mstate)
            return tracker, memory

        def features(tstate, trunk_features):
            self._traced("features")
            return tracker_lib.frame_features(nnx.merge(tdef, tstate), trunk_features)

        def step(tstate, mstate, frame, bank, sel):
            self._traced("track_step")
            tracker, memory = models(tstate, mstate)
            return tracker_lib.track_step(tracker, memory, frame, bank, sel)

        def mask_prompt(tstate, frame, mask):
            self._traced("mask_prompt")
            return tracker_lib.mask_prompt(nnx.merge(tdef, tstate), frame, mask)

        def click_prompt(tstate, frame, coords, labels, prev, multimask):
            self._traced("click_prompt")
            return tracker_lib.click_prompt(
                nnx.merge(tdef, tstate), frame, coords, labels, prev, multimask_output=multimask
            )

        def prompt_memory(tstate, mstate, frame, low_res, scores, prompted):
            self._traced("prompt_memory")
            tracker, memory = models(tstate, mstate)
            return tracker_lib.prompt_memory(tracker, memory, frame, low_res, scores, prompted)

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

    def _trunk_fn(self):
        if self._trunk is None:
            try:
                from es3_jax.models.trunk import trunk_from_config
            except ImportError as e:  # pragma: no cover - the trunk ships with es3
                raise PredictorError(f"frames need the trunk, which could not be imported: {e}") from e
            trunk = trunk_from_config(self.cfg, self._trunk_params, seed=self.seed)
            tdef, tstate = nnx.split(trunk)

            @jax.jit
            def run(state, images):
                self._traced("trunk")
                return nnx.merge(tdef, state)(images)

            self._trunk = (run, tstate)
        return self._trunk

    def _images_source(self, load, num_frames: int) -> _FrameSource:
        """A source that runs the trunk on normalised frames `load(i) -> [S, S, 3]` float32."""
        from es3_jax.data.frames import normalize

        data = self.cfg.DATA

        def get(i: int) -> jax.Array:
            run, state = self._trunk_fn()
            image = normalize(load(i), data.PIXEL_MEAN, data.PIXEL_STD)[None]
            return self._timed("trunk", run, state, jnp.asarray(image))

        return _FrameSource(num_frames, get)

    def init_state(
        self,
        video: str | Path | np.ndarray | tuple[Any, str],
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
        size = self.teacher_cfg.IMAGE_SIZE
        if isinstance(video, tuple):
            store, video_id = video
            meta = store.metadata(video_id)
            num_frames = int(meta["num_frames"])
            hw = meta.get("orig_size") or meta.get("video_size")
            video_size = video_size or (tuple(int(v) for v in hw[:2]) if hw else (size, size))

            def get(i: int) -> jax.Array:
                start = time.perf_counter()
                out = jnp.asarray(store.read(video_id, [i], dtype=np.float32))
                self.timings["read"] = self.timings.get("read", 0.0) + 1000 * (time.perf_counter() - start)
                return out

            source = _FrameSource(num_frames, get)
        elif isinstance(video, str | Path):
            from es3_jax.data.frames import list_frames, load_frame_uint8

            paths = list_frames(video)
            _, hw = load_frame_uint8(paths[0], size)
            video_size = video_size or hw
            source = self._images_source(lambda i: load_frame_uint8(paths[i], size)[0], len(paths))
        else:
            video = np.asarray(video)
            if video.ndim != 4:
                raise PredictorError(
                    f"video array must be [T, H, W, 3] frames or [T, g, g, C] features, got {video.shape}"
                )
            if video.dtype == np.uint8 and video.shape[-1] == 3:
                from PIL import Image

                video_size = video_size or video.shape[1:3]

                def load(i: int) -> np.ndarray:
                    img = Image.fromarray(video[i]).resize((size, size), Image.Resampling.BILINEAR)
                    return np.asarray(img)

                source = self._images_source(load, video.shape[0])
            else:
                g, c = self.teacher_cfg.grid, self.teacher_cfg.TRUNK_DIM
                if video.shape[1:] != (g, g, c):
                    raise PredictorError(
                        f"trunk features must be [T, {g}, {g}, {c}] for this model, got {video.shape}"
                    )
                video_size = video_size or (size, size)
                source = _FrameSource(video.shape[0], lambda i: jnp.asarray(video[i : i + 1], jnp.float32))
        if source.num_frames < 1:
            raise PredictorError("the video has no frames")
        return State(source.num_frames, (int(video_size[0]), int(video_size[1])), source)

    def reset_state(self, state: State) -> None:
        """Forget every object, prompt and memory of the state (the video stays)."""
        state.obj_ids.clear()
        state.prompts.clear()
        state.bank = None
        state.cond_slots.clear()
        state.entries.clear()

    def _frame(self, state: State, idx: int) -> tracker_lib.FrameFeatures:
        if not 0 <= idx < state.num_frames:
            raise PredictorError(f"frame index {idx} outside the video's {state.num_frames} frames")
        if state.cached is not None and state.cached[0] == idx:
            return state.cached[1]
        trunk = state.source.get(idx)
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

    def _capacity(self, state: State) -> tuple[int, int, int, int]:
        """(cond slots, recent spatial slots, recent pointer slots, spatial slots read per step)."""
        t = self.teacher_cfg
        most = max((len(f) for f in state.prompts.values()), default=1)
        cond = max(t.MAX_COND_FRAMES_IN_ATTN, -(-most // 4) * 4)
        return cond, t.NUM_MASKMEM, t.MAX_OBJ_PTRS_IN_ENCODER, t.MAX_COND_FRAMES_IN_ATTN + t.NUM_MASKMEM - 1

    def _preflight(self, state: State) -> None:
        """A fresh bank holding the memories of every prompted frame."""
        if not any(state.prompts.values()):
            raise PredictorError("no prompts: add a mask, points or a box first")
        o = state.num_objects
        cond, recent, recent_ptrs, _ = self._capacity(state)
        g, d = self.teacher_cfg.grid, self.teacher_cfg.D_MODEL
        state.cond_slots = [{} for _ in range(o)]
        state.entries = [[] for _ in range(o)]
        bank = None
        prompt_frames = sorted({f for frames in state.prompts.values() for f in frames})
        for f in prompt_frames:
            frame = self._frame(state, f)
            low = np.full((o, 4 * g, 4 * g), NO_OBJ_SCORE, np.float32)
            scores = np.zeros((o,), np.float32)
            prompted = np.zeros((o,), bool)
            ptrs = jnp.zeros((o, d), jnp.float32)
            for obj in range(o):
                p = state.prompts[obj].get(f)
                if p is not None:
                    low[obj], scores[obj], prompted[obj] = p.low_res, p.object_score, True
                    ptrs = ptrs.at[obj].set(p.obj_ptr)
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
                bank = tracker_lib.empty_bank(
                    o, cond + recent, cond + recent_ptrs, tokens.shape[1:], d, self.storage_dtype
                )
            slots = np.zeros((o,), np.int32)
            for obj in np.flatnonzero(prompted):
                slots[obj] = len(state.cond_slots[obj])
                state.cond_slots[obj][f] = (int(slots[obj]), int(slots[obj]))
            bank = tracker_lib.write_memory(
                bank, tokens, tokens_pos, ptrs, jnp.asarray(slots), jnp.asarray(slots), jnp.asarray(prompted)
            )
        state.bank = bank

    def _valid_frames(self, entries: list[_Entry], frame: int, reverse: bool, num_frames: int) -> list[int]:
        """Upstream `frame_filter` (memory selection) over one object's retained tracked frames."""
        if (frame == 0 and not reverse) or (frame == num_frames - 1 and reverse):
            return []
        max_num = min(num_frames, self.teacher_cfg.MAX_OBJ_PTRS_IN_ENCODER)
        scored = {e.frame: e.score for e in entries}
        scan = range(frame - 1, 0, -1) if not reverse else range(frame + 1, num_frames)
        valid: list[int] = []
        for i in scan:
            if i not in scored:
                continue
            if scored[i] > self.teacher_cfg.MF_THRESHOLD:
                valid.insert(0, i)
            if len(valid) >= max_num - 1:
                break
        must = frame + 1 if reverse else frame - 1
        if must not in valid:
            valid.append(must)
        return valid

    def _selection(
        self, state: State, frame: int, reverse: bool, tracked: np.ndarray
    ) -> tracker_lib.Selection:
        """The bank entries each tracked object reads at `frame`, and where its new memory goes."""
        t = self.teacher_cfg
        o = state.num_objects
        cond_cap, recent_cap, recent_ptr_cap, s_slots = self._capacity(state)
        p_slots = t.MAX_COND_FRAMES_IN_ATTN + t.MAX_OBJ_PTRS_IN_ENCODER - 1
        sign = -1 if reverse else 1
        num_frames = state.num_frames
        max_ptrs = min(num_frames, t.MAX_OBJ_PTRS_IN_ENCODER)
        arrays = {
            "frame_slot": np.zeros((o, s_slots), np.int32),
            "frame_tpos": np.zeros((o, s_slots), np.int32),
            "frame_valid": np.zeros((o, s_slots), bool),
            "pointer_slot": np.zeros((o, p_slots), np.int32),
            "pointer_rel": np.zeros((o, p_slots), np.float32),
            "pointer_valid": np.zeros((o, p_slots), bool),
            "write_slot": np.zeros((o,), np.int32),
            "write_pointer_slot": np.zeros((o,), np.int32),
        }
        for obj in np.flatnonzero(tracked):
            cond = state.cond_slots[obj]
            selected, unselected = _select_closest_cond(frame, list(cond), t.MAX_COND_FRAMES_IN_ATTN)
            recent = {e.frame: e for e in state.entries[obj]}

            def lookup(i: int, recent=recent, cond=cond, unselected=unselected):
                if i in recent:
                    e = recent[i]
                    return (None if e.slot is None else cond_cap + e.slot), cond_cap + e.pointer_slot
                if i in unselected:
                    return cond[i]
                return None

            spatial = [(cond[c][0], t.NUM_MASKMEM - 1) for c in selected]
            valid = (
                self._valid_frames(state.entries[obj], frame, reverse, num_frames)
                if t.USE_MEMORY_SELECTION
                else []
            )
            for t_pos in range(1, t.NUM_MASKMEM):
                t_rel = t.NUM_MASKMEM - t_pos
                if t.USE_MEMORY_SELECTION:
                    if t_rel > len(valid):
                        continue
                    prev = valid[-t_rel]
                else:
                    prev = frame - sign * t_rel
                hit = lookup(prev)
                if hit is not None and hit[0] is not None:
                    spatial.append((hit[0], t.NUM_MASKMEM - t_pos - 1))
            for k, (slot, tpos) in enumerate(spatial):
                arrays["frame_slot"][obj, k] = slot
                arrays["frame_tpos"][obj, k] = tpos
                arrays["frame_valid"][obj, k] = True
            pointers = [
                (cond[c][1], (frame - c) * sign) for c in selected if (c >= frame if reverse else c <= frame)
            ]
            for t_diff in range(1, max_ptrs):
                if t.USE_MEMORY_SELECTION:
                    if t_diff >= len(valid):
                        break
                    prev = valid[-t_diff]
                else:
                    prev = frame - sign * t_diff
                    if prev < 0 or prev >= num_frames:
                        break
                hit = lookup(prev)
                if hit is not None:
                    pointers.append((hit[1], t_diff))
            for k, (slot, rel) in enumerate(pointers):
                arrays["pointer_slot"][obj, k] = slot
                arrays["pointer_rel"][obj, k] = rel
                arrays["pointer_valid"][obj, k] = True
            slot, pointer_slot = self._free_slots(state.entries[obj], recent_cap, recent_ptr_cap)
            arrays["write_slot"][obj] = cond_cap + slot
            arrays["write_pointer_slot"][obj] = cond_cap + pointer_slot
        return tracker_lib.Selection(
            **{k: jnp.asarray(v) for k, v in arrays.items()},
            pointer_scale=jnp.float32(max(max_ptrs - 1, 1)),
            write=jnp.asarray(tracked),
        )

    def _retain(self, entries: list[_Entry]) -> None:
        """Drop what no future step can read (entries are in tracking order, latest last).

        The next frame reads at most the latest entry plus the `num_maskmem − 1` most recent
        frames (spatial) and `max pointers − 1` (pointers): by recency, or with memory selection
        among the frames whose score passes the threshold.
        """
        t = self.teacher_cfg
        ranked = entries[::-1]
        if t.USE_MEMORY_SELECTION:
            ranked = [e for e in ranked if e.score > t.MF_THRESHOLD]
        keep_spatial = {id(e) for e in ranked[: t.NUM_MASKMEM - 1]}
        keep_pointer = {id(e) for e in ranked[: t.MAX_OBJ_PTRS_IN_ENCODER - 1]}
        if entries:
            keep_spatial.add(id(entries[-1]))
            keep_pointer.add(id(entries[-1]))
        for e in entries:
            if id(e) not in keep_spatial:
                e.slot = None
        entries[:] = [e for e in entries if id(e) in keep_pointer]

    def _free_slots(self, entries: list[_Entry], recent: int, recent_ptrs: int) -> tuple[int, int]:
        """A spatial and a pointer slot for the new entry, among those the retained entries leave.

        Before this frame's score is known, the latest entry is kept only as an ordinary frame
        (the next step no longer needs it as "the previous frame"), which always frees one slot.
        """
        t = self.teacher_cfg
        ranked = entries[::-1]
        if t.USE_MEMORY_SELECTION:
            ranked = [e for e in ranked if e.score > t.MF_THRESHOLD]
        used = {e.slot for e in ranked[: t.NUM_MASKMEM - 1] if e.slot is not None}
        used_ptr = {e.pointer_slot for e in ranked[: t.MAX_OBJ_PTRS_IN_ENCODER - 1]}
        slot = next(s for s in range(recent) if s not in used)
        pointer_slot = next(s for s in range(recent_ptrs) if s not in used_ptr)
        return slot, pointer_slot

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
                sel = self._selection(state, frame_idx, reverse, tracked)
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
                write_slot = np.asarray(sel.write_slot)
                write_ptr = np.asarray(sel.write_pointer_slot)
                cond_cap = self._capacity(state)[0]
                for obj in np.flatnonzero(tracked):
                    low_res[obj] = step_low[obj]
                    entries = state.entries[obj]
                    entries.append(
                        _Entry(
                            frame_idx, score, int(write_slot[obj]) - cond_cap, int(write_ptr[obj]) - cond_cap
                        )
                    )
                    self._retain(entries)
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


def _is_merged_export(path: Path) -> bool:
    try:
        from porting.export import is_merged_file
    except ImportError:  # without torch there is nothing to read a .pt with anyway
        return False
    return is_merged_file(path)


def _unused_memory_attention(cfg: config_lib.Config) -> dict:
    """Zeros in the teacher's memory-attention shapes: the tracker module holds them, the student's
    path never reads them."""
    from es3_jax.models.tracker import expected_param_shapes
    from es3_jax.params import unflatten

    shapes = expected_param_shapes(cfg.MODEL.TEACHER)
    prefix = "memory_attention."
    return unflatten(
        {p.removeprefix(prefix): np.zeros(s, np.float32) for p, s in shapes.items() if p.startswith(prefix)}
    )


def _try_port_trunk(path: Path) -> dict | None:
    """The trunk of a sam3.pt when the checkpoint has one (None: frames then need another trunk)."""
    try:
        from porting.sam3_checkpoint import port_trunk
    except ImportError:
        return None
    try:
        return port_trunk(path)
    except Es3Error:
        return None
