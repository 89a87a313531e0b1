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
  pass; prompts go on the newest frame before it is tracked. A streamed frame's masks are those of
  `propagate_in_video` while no object tracked through it is prompted on a later frame: a pass
  reads such a later conditioning frame (as upstream's does), a stream cannot.
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

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from es3_jax import config as config_lib
from es3_jax import weights
from es3_jax.models.student import student_from_config
from es3_jax.models.tracker import SAM3Tracker, build_tracker
from es3_jax.predictor.frame_sources import Video, open_video
from es3_jax.predictor.jax_engine import JaxEngine
from es3_jax.predictor.prompts import PredictorError
from es3_jax.predictor.session import State, TrackingSession


class VideoPredictor(TrackingSession):
    """Tracks objects through a video with the SAM3 tracker (teacher) or a distilled student: a
    tracking session over the JAX engine."""

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
        engine = JaxEngine(
            cfg,
            tracker,
            tracker.memory_path() if student is None else student,
            trunk_params=trunk_params,
            seed=seed,
            storage_dtype=storage_dtype,
            objects_per_batch=objects_per_batch,
        )
        super().__init__(engine, cfg.MODEL.TEACHER)
        self.cfg = cfg
        self.seed = seed
        self.storage_dtype = storage_dtype
        self.objects_per_batch = objects_per_batch
        self.memory = "teacher" if student is None else "student"  # whose memory path the steps run
        self.trace_counts = engine.trace_counts

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
        else:
            params = {k: v for k, v in params.items() if k != "memory_attention"}
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

    def modules(self) -> tuple[SAM3Tracker, nnx.Module, nnx.Module]:
        """(tracker, the memory path its steps read: its own or the student, trunk): modules holding
        the predictor's weights, for an export to trace. The trunk is built here when no frame has
        needed it yet."""
        return self.engine.modules()

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
        return State(open_video(video, self.cfg, self.engine.run_trunk, self.engine.timed, video_size))


def _is_student_config(cfg: config_lib.Config) -> bool:
    m = cfg.MODEL
    return (
        m.PERCEIVER.ENABLED
        or m.MEMORY_ATTENTION.POOL_SIZE > 1
        or m.MEMORY_ATTENTION.NUM_LAYERS != m.TEACHER.MEMORY_ATTENTION_LAYERS
    )
