"""What a weights source holds, as `es3_jax.weights.load` returns it: `Weights`.

Apart from the loader so that porting/ (which the loader enters for PyTorch files) can take
`Weights` without importing the loader.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from es3_jax import config as config_lib
from es3_jax.errors import Es3Error
from es3_jax.models.trunk import trunk_from_config
from es3_jax.params import param_dict


class WeightsError(Es3Error):
    """A weights source that is missing, unreadable or unusable where it is given; the message names it."""


@dataclasses.dataclass
class Weights:
    """What a weights source holds: nested es3 parameter dicts (numpy) and the config describing them."""

    cfg: config_lib.Config
    source: str  # the path as given, or "random (seed N)"
    kind: str  # see `es3_jax.weights`
    tracker: dict | None = None  # SAM3Tracker parameters
    student: dict | None = None  # the student's memory path: memory_attention, spatial_perceiver
    trunk: dict | None = None  # ViTTrunk parameters
    trained: dict = dataclasses.field(default_factory=dict)  # tracker modules a fine-tuning run trained
    step: int | None = None  # the training step, for a run's weights
    report: dict = dataclasses.field(default_factory=dict)  # what was read and what was not used
    state_dict: Mapping[str, Any] | None = None  # a PyTorch file's tensors, as read

    @property
    def has_teacher_memory(self) -> bool:
        """Whether the tracker has its own memory attention (a student-only merged export has not)."""
        return self.tracker is not None and "memory_attention" in self.tracker

    def require_teacher(self) -> None:
        """Refuse weights that cannot serve as the frozen teacher (or the tracker to fine-tune)."""
        if self.tracker is None:
            raise WeightsError(f"{self.source}: holds no tracker")
        if not self.has_teacher_memory:
            raise WeightsError(
                f"{self.source}: a merged export whose memory path is a distilled student holds no "
                "teacher memory attention to distil from or fine-tune; give the tracker it was exported "
                "from (e.g. sam3.pt), or track with it (`es3 track --checkpoint`)"
            )

    def trunk_params(self, seed: int) -> dict:
        """The trunk parameters, or a trunk drawn from `seed` when these weights are random."""
        if self.trunk is not None:
            return self.trunk
        if self.kind == "random":
            return param_dict(trunk_from_config(self.cfg, seed=seed))
        raise WeightsError(
            f"{self.source}: holds no trunk weights, so it cannot compute trunk features from frames; "
            "give weights with a trunk (sam3.pt, a stage-1 merged checkpoint, or `es3 port` of one), or "
            "pre-computed embeddings "
            "(`es3 embed`, then DATA.USE_PRECOMPUTED True / `es3 track --embeddings`)"
        )
