"""`FrameStream`: frames that arrive one at a time, of which only the newest is kept.

Plain host code, the stream bookkeeping of the tracking session (`es3_jax.predictor.session`),
whatever its engine: frame indices, the masks' size, one frame shape for the whole
stream, and the rule that a frame is prompted on arrival and tracked once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from es3_jax.predictor.prompts import PredictorError


@dataclasses.dataclass
class FrameStream:
    size: tuple[int, int] | None  # (H, W) of the masks; None: the first frame's
    num_frames: int = 0
    newest: Any = None  # the newest frame's features, in the form its tracker runs on
    frame_shape: tuple[int, ...] | None = None
    tracked: bool = False  # the newest frame's masks were given

    @classmethod
    def of_size(cls, video_size: Sequence[int] | None) -> FrameStream:
        """A stream whose masks are `video_size` (H, W), or the first frame's size (None)."""
        return cls(None if video_size is None else (int(video_size[0]), int(video_size[1])))

    @property
    def video_size(self) -> tuple[int, int]:
        if self.size is None:
            raise PredictorError("the stream has no frame yet: add_frame first")
        return self.size

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Refuse an image `[H, W, 3]` of another size than the stream's earlier ones."""
        if self.frame_shape not in (None, shape):
            raise PredictorError(
                f"frame {self.num_frames} of the stream is {shape[1]}x{shape[0]} (width x height), "
                f"the earlier ones {self.frame_shape[1]}x{self.frame_shape[0]}"
            )

    def push(self, features: Any, frame_shape: tuple[int, ...], size: Sequence[int]) -> int:
        """The next frame's features (its input's shape, its (H, W)) -> its index."""
        if self.size is None:
            self.size = (int(size[0]), int(size[1]))
        self.frame_shape = frame_shape
        self.newest, self.tracked = features, False
        self.num_frames += 1
        return self.num_frames - 1

    def features(self, i: int) -> Any:
        """Frame `i`'s features: the newest frame's only."""
        if self.num_frames == 0:
            raise PredictorError("the stream has no frame yet: add_frame first")
        if i != self.num_frames - 1:
            raise PredictorError(
                f"frame {i} of a stream: only the newest frame ({self.num_frames - 1}) is kept; "
                "prompt a frame when it arrives, before track_frame"
            )
        return self.newest

    def check_promptable(self, i: int) -> None:
        """Refuse a prompt on any frame but the newest, or on the newest once it was tracked."""
        self.features(i)
        if self.tracked:
            raise PredictorError(
                f"frame {i} of the stream was tracked already: prompt a frame before track_frame"
            )

    def to_track(self) -> int:
        """The index of the newest frame, about to be tracked; refuses a stream without frames or
        whose newest frame was tracked."""
        if self.num_frames == 0:
            raise PredictorError("the stream has no frame yet: add_frame first")
        if self.tracked:
            raise PredictorError(f"frame {self.num_frames - 1} was tracked already: add the next frame")
        return self.num_frames - 1
