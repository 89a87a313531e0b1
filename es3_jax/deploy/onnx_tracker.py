"""`OnnxTracker`: tracking with an ONNX export on onnxruntime, in numpy: no jax, no torch.

```python
tracker = OnnxTracker("exports/student_onnx")               # es3 export --format onnx ...
state = tracker.init_stream()
for image in read_frames("video_frames/"):                   # or a camera: [H, W, 3] uint8 RGB
    frame_idx = tracker.add_frame(state, image)
    if frame_idx == 0:
        tracker.add_new_mask(state, frame_idx, obj_id=1, mask=mask)
    _, obj_ids, logits = tracker.track_frame(state)        # [O, H, W] logits of that frame
```

The stream API of `VideoPredictor` (`init_stream`, `add_frame`, `add_new_mask`,
`add_new_points_or_box`, `track_frame`), with the predictor's host code: the memory-bank schedule
(`MemorySchedule`), the prompt handling (`es3_jax.predictor.prompts`) and the resizing
(`es3_jax.interpolation`). The bank is a set of numpy arrays of the export's fixed shapes; each
graph returns the bank it wrote. What the export fixed, the tracker refuses to exceed, naming the
export flag that changes it: objects (`--objects`), clicks per prompt (`--points`), prompted
frames per object within the memory's reach (`--cond_frames`). Clicks that refine an object's
earlier clicks on the same frame need its previous logits as a mask input, which the click graph
does not take: prompt such a frame once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from es3_jax import config as config_lib
from es3_jax.data.frames import list_frames, normalize, read_frame, resize_frame
from es3_jax.deploy.manifest import BANK, CONFIG, INPUTS, NEXT_BANK, OUTPUTS, Manifest
from es3_jax.interpolation import resize_bilinear
from es3_jax.logits import NO_OBJ_SCORE
from es3_jax.memory.policy import bank_policy
from es3_jax.memory.schedule import MemorySchedule, frame_score
from es3_jax.predictor.prompts import (
    PredictorError,
    Prompt,
    Prompts,
    carve,
    click_inputs,
    frame_prompt_logits,
    low_res_of,
    mask_inputs,
    started,
)
from es3_jax.predictor.stream import FrameStream

# The export flag that sets each input's shape, for the error a mismatched input gets (the rest:
# the number of objects, and for the bank the conditioning slots too).
_FLAG = {
    "image": "--image_size S",
    "mask": "--image_size S",
    "point_coords": "--points P",
    "point_labels": "--points P",
    **{name: "--objects O / --cond_frames N" for name in BANK},
}


class OnnxShapeError(PredictorError):
    """An input whose shape or dtype the exported graph was not built for."""


@dataclasses.dataclass
class StreamState:
    """A stream tracked with an export: its frames (the newest one's image-encoder outputs), its
    prompts and the memory bank."""

    stream: FrameStream
    obj_ids: list[int] = dataclasses.field(default_factory=list)
    prompts: Prompts = dataclasses.field(default_factory=dict)
    schedule: MemorySchedule | None = None
    bank: dict[str, np.ndarray] | None = None  # BANK names -> arrays

    @property
    def video_size(self) -> tuple[int, int]:
        return self.stream.video_size


def read_frames(folder: str | Path) -> Iterator[np.ndarray]:
    """The frames of a folder (sorted by integer stem), `[H, W, 3]` uint8 RGB, one at a time."""
    for path in list_frames(folder):
        yield read_frame(path)


class OnnxTracker:
    """Tracks objects through a stream of frames with the graphs of one ONNX export."""

    def __init__(
        self,
        folder: str | Path,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
    ):
        """folder: what `es3 export --format onnx` wrote. threads: onnxruntime's intra-op threads
        (None: its default, one per core)."""
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        self.cfg = config_lib.load(self.folder / CONFIG)
        self.teacher_cfg = self.cfg.MODEL.TEACHER
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: jax2onnx leaves unused shape constants ORT warns of
        if threads is not None:
            options.intra_op_num_threads = threads
        self.sessions = {
            name: ort.InferenceSession(os.fspath(self.folder / file), options, providers=list(providers))
            for name, file in self.manifest.graphs.items()
        }
        for name, session in self.sessions.items():
            got = tuple(i.name for i in session.get_inputs())
            if got != INPUTS[name]:
                raise OnnxShapeError(
                    f"{self.folder / self.manifest.graphs[name]}: inputs {got}, es3 expects {INPUTS[name]}"
                )

    # ----------------------------------------------------------------------------------------
    # graphs

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One graph on named numpy inputs -> its named outputs; an input of another shape or dtype
        than the export's is refused, naming it and the export flag that sets it."""
        session = self.sessions[graph]
        feeds = {}
        for meta in session.get_inputs():
            if meta.name not in inputs:
                raise OnnxShapeError(f"{graph}: input {meta.name} is missing")
            x = np.asarray(inputs[meta.name])
            want = tuple(meta.shape)
            dtype = _NUMPY_DTYPE[meta.type]
            if x.shape != want or x.dtype != dtype:
                raise OnnxShapeError(
                    f"{graph}: input {meta.name} is {x.dtype}{list(x.shape)}, the export takes "
                    f"{np.dtype(dtype)}{list(want)}; {self._flag_hint(meta.name)}"
                )
            feeds[meta.name] = x
        try:
            outputs = session.run(None, feeds)
        except (
            ort.capi.onnxruntime_pybind11_state.InvalidArgument,
            ort.capi.onnxruntime_pybind11_state.Fail,
        ) as e:
            raise OnnxShapeError(f"{graph}: onnxruntime refused the inputs: {e}") from e
        return dict(zip(OUTPUTS[graph], outputs, strict=True))

    def _flag_hint(self, name: str) -> str:
        m = self.manifest
        return (
            f"this export is {m.image_size} px, {m.objects} objects, {m.points}-point clicks, "
            f"{m.layout.cond} conditioning slots: export another with es3 export --format onnx "
            f"{_FLAG.get(name, '--objects O')}"
        )

    # ----------------------------------------------------------------------------------------
    # the stream

    def init_stream(self, video_size: tuple[int, int] | None = None) -> StreamState:
        """A new stream; video_size: (H, W) of the masks, default the first frame's size."""
        return StreamState(FrameStream.of_size(video_size))

    def add_frame(self, state: StreamState, frame: np.ndarray) -> int:
        """The next frame `[H, W, 3]` uint8 RGB (every frame of one size); returns its index. The
        image encoder runs now; earlier frames are let go."""
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
            raise PredictorError(f"a stream frame must be [H, W, 3] uint8, got {frame.dtype} {frame.shape}")
        state.stream.check_shape(frame.shape)
        data = self.cfg.DATA
        image = normalize(resize_frame(frame, self.manifest.image_size), data.PIXEL_MEAN, data.PIXEL_STD)[
            None
        ]
        return state.stream.push(self.run("image_encoder", {"image": image}), frame.shape, frame.shape[:2])

    def _obj_idx(self, state: StreamState, obj_id: int) -> int:
        if obj_id not in state.obj_ids:
            if len(state.obj_ids) == self.manifest.objects:
                raise PredictorError(
                    f"object {obj_id}: this export tracks {self.manifest.objects} objects "
                    f"({state.obj_ids}); export another with es3 export --format onnx --objects O"
                )
            state.obj_ids.append(obj_id)
            state.prompts[len(state.obj_ids) - 1] = {}
        return state.obj_ids.index(obj_id)

    def add_new_mask(
        self, state: StreamState, frame_idx: int, obj_id: int, mask: np.ndarray
    ) -> tuple[int, list[int], np.ndarray]:
        """A mask prompt `[h, w]` (bool or [0, 1], any size) for one object on the newest frame ->
        (frame_idx, obj_ids, logits `[O, H, W]` of that frame). Where it overlaps masks given earlier
        on the frame, the new mask wins."""
        state.stream.check_promptable(frame_idx)
        g = self.manifest.grid
        m_in, logits = mask_inputs(mask, g, state.video_size)
        obj = self._obj_idx(state, obj_id)
        out = self.run("mask_prompt", {**state.stream.newest, "mask": m_in[None]})
        carve(state.prompts, frame_idx, obj, logits, g)
        state.prompts[obj][frame_idx] = Prompt(
            "mask",
            low_res_of(logits, g),
            logits,
            out["obj_ptr"][0],
            float(out["object_score_logits"][0]),
            float(out["iou_score"][0]),
        )
        return (
            frame_idx,
            list(state.obj_ids),
            frame_prompt_logits(state.prompts, frame_idx, len(state.obj_ids), state.video_size),
        )

    def add_new_points_or_box(
        self,
        state: StreamState,
        frame_idx: int,
        obj_id: int,
        points: np.ndarray | Sequence | None = None,
        labels: np.ndarray | Sequence | None = None,
        box: np.ndarray | Sequence | None = None,
    ) -> tuple[int, list[int], np.ndarray]:
        """Clicks `[P, 2]` (x, y video pixels) with labels `[P]` (1 positive, 0 negative) and/or a box
        (x0, y0, x1, y1; two of the P points) for one object on the newest frame, as many as the
        export's click graph takes -> (frame_idx, obj_ids, logits `[O, H, W]` of that frame)."""
        state.stream.check_promptable(frame_idx)
        coords, labs = click_inputs(
            points,
            labels,
            box,
            image_size=self.manifest.image_size,
            video_size=state.video_size,
            previous=None,
            clear_old_points=True,
        )
        if len(labs) != self.manifest.points:
            raise OnnxShapeError(
                f"{len(labs)} points (a box is 2): the export's click graph takes {self.manifest.points}; "
                "export another with es3 export --format onnx --points P"
            )
        obj = self._obj_idx(state, obj_id)
        previous = state.prompts[obj].get(frame_idx)
        if previous is not None and previous.kind == "points":
            raise PredictorError(
                f"object {obj_id} has clicks on frame {frame_idx} already: refining them needs its previous "
                "logits as a mask input, which the ONNX click graph does not take"
            )
        out = self.run(
            "click_prompt", {**state.stream.newest, "point_coords": coords[None], "point_labels": labs[None]}
        )
        state.prompts[obj][frame_idx] = Prompt(
            "points",
            out["low_res_masks"][0],
            None,
            out["obj_ptr"][0],
            float(out["object_score_logits"][0]),
            float(out["iou_score"][0]),
            coords,
            labs,
        )
        return (
            frame_idx,
            list(state.obj_ids),
            frame_prompt_logits(state.prompts, frame_idx, len(state.obj_ids), state.video_size),
        )

    def track_frame(
        self, state: StreamState, frame: np.ndarray | None = None
    ) -> tuple[int, list[int], np.ndarray]:
        """The masks of the newest frame (after adding `frame`, when given): (frame_idx, obj_ids,
        logits `[O, H, W]` float32 at video resolution; no object yet: `[0, H, W]`). Objects prompted
        on it get their prompts' masks and join the memory; those prompted earlier are tracked."""
        if frame is not None:
            self.add_frame(state, frame)
        idx = state.stream.to_track()
        h, w = state.video_size
        o = len(state.obj_ids)
        logits = np.zeros((0, h, w), np.float32)
        if any(state.prompts.values()):
            if state.schedule is None:
                self._new_memory(state)
            low = self._frame_output(state, idx)
            logits = resize_bilinear(low[:o], h, w)
        state.stream.tracked = True
        return idx, list(state.obj_ids), logits

    def reset_state(self, state: StreamState) -> None:
        """Forget every object, prompt and memory of the stream (its frames go on)."""
        state.obj_ids.clear()
        state.prompts.clear()
        state.schedule, state.bank = None, None

    # ----------------------------------------------------------------------------------------
    # memory

    def _new_memory(self, state: StreamState) -> None:
        m, t = self.manifest, self.teacher_cfg
        state.schedule = MemorySchedule(t, m.layout, None, m.objects, policy=bank_policy(t))
        state.bank = {name: np.zeros(shape, np.float32) for name, shape in m.bank_shapes.items()}

    def _condition(self, state: StreamState, obj: int, frame: int) -> int:
        """A conditioning slot for `obj`'s prompt on `frame`, freeing those no later frame reads."""
        schedule = state.schedule
        if schedule.needs_slot(obj, frame):
            for old in schedule.forget_cond(obj, frame):
                state.prompts[obj].pop(old, None)
            if schedule.needs_slot(obj, frame):
                raise PredictorError(
                    f"object {state.obj_ids[obj]}: prompts on more than {schedule.layout.cond} frames that "
                    "the memory still reads; export another with es3 export --format onnx --cond_frames N"
                )
        return schedule.condition(obj, frame)

    def _frame_output(self, state: StreamState, f: int) -> np.ndarray:
        """Frame `f` as `VideoPredictor` makes a stream's frame: the prompted objects' memories
        written, the started ones tracked through memory -> low-res logits `[O, 4g, 4g]`."""
        m = self.manifest
        o, g = m.objects, m.grid
        prompts = state.prompts
        low = np.full((o, 4 * g, 4 * g), NO_OBJ_SCORE, np.float32)
        ptrs = np.zeros((o, m.pointer_dim), np.float32)
        scores = np.zeros((o,), np.float32)
        prompted = np.array([f in prompts.get(obj, {}) for obj in range(o)])
        tracked = np.array([started(prompts.get(obj, {}), f, False) for obj in range(o)]) & ~prompted
        slots = np.zeros((o,), np.int32)
        for obj in np.flatnonzero(prompted):
            p = prompts[obj][f]
            low[obj], ptrs[obj], scores[obj] = p.low_res, p.obj_ptr, p.object_score
            slots[obj] = self._condition(state, obj, f)
        if prompted.any():
            inputs = {
                "low_res_masks": low,
                "object_score_logits": scores,
                "obj_ptr": ptrs,
                "prompted": prompted,
                "cond_slot": slots,
            }
            out = self.run("prompt_memory", {**state.stream.newest, **inputs, **state.bank})
            state.bank = dict(zip(BANK, (out[name] for name in NEXT_BANK), strict=True))
        if tracked.any():
            reads = state.schedule.select(f, False, tracked)
            out = self.run("track_step", {**state.stream.newest, **state.bank, **reads})
            state.bank = dict(zip(BANK, (out[name] for name in NEXT_BANK), strict=True))
            low[tracked] = out["low_res_masks"][tracked]
            score = frame_score(out["presence"], out["iou_score"], tracked)
            state.schedule.record(f, reads, score)
        return low


_NUMPY_DTYPE = {
    "tensor(float)": np.float32,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}
