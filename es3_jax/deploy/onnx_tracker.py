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
`add_new_points_or_box`, `track_frame`, `reset_state`): the same tracking session
(`es3_jax.predictor.session`) over the export's graphs (`onnx_engine.OnnxEngine`). What the export
fixed, the tracker refuses to exceed, naming the export flag that changes it: objects
(`--objects`), clicks per prompt (`--points`), prompted frames per object within the memory's
reach (`--cond_frames`). Clicks that refine an object's earlier clicks on the same frame need its
previous logits as a mask input, which the click graph does not take: prompt such a frame once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from es3_jax.data.frames import list_frames, read_frame
from es3_jax.deploy.onnx_engine import OnnxEngine
from es3_jax.predictor.session import TrackingSession


def read_frames(folder: str | Path) -> Iterator[np.ndarray]:
    """The frames of a folder (sorted by integer stem), `[H, W, 3]` uint8 RGB, one at a time."""
    for path in list_frames(folder):
        yield read_frame(path)


class OnnxTracker(TrackingSession):
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
        engine = OnnxEngine(folder, providers=providers, threads=threads)
        super().__init__(engine, engine.cfg.MODEL.TEACHER)
        self.folder, self.manifest, self.cfg = engine.folder, engine.manifest, engine.cfg
        self.sessions, self.run = engine.sessions, engine.run
