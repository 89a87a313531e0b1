"""`Engine`: the five operations a tracking session drives, and what an engine can do.

A `TrackingSession` (`es3_jax.predictor.session`) holds every host-side decision (prompts, the
frame stream, the bank schedule, corrections, objects in batches) and asks an engine only to
compute: encode a frame, decode a mask or a click prompt, write a prompted frame's memory, track a
frame through memory. The JAX engine (`jax_engine.JaxEngine`) runs them jit-compiled, the ONNX
engine (`es3_jax.deploy.onnx_engine.OnnxEngine`) as exported graphs on onnxruntime. Everything
here is plain numpy: the ONNX driver imports it without jax.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np

from es3_jax.memory.schedule import BankLayout


@dataclasses.dataclass(frozen=True)
class Limits:
    """What an engine was built for; None: no limit. `remedies` names, per limit, how to lift it
    (e.g. the export flag that sets it), for the error a session gives when a call exceeds it."""

    name: str  # how errors name the engine, e.g. "this export"
    objects: int | None = None  # objects one state tracks
    bank_rows: int | None = None  # objects sharing one bank and step (None: all of a state's)
    layout: BankLayout | None = None  # every bank's, fixed; None: sized to the prompts, growing
    refines_clicks: bool = True  # clicks decoded with the object's earlier logits on the frame
    remedies: dict[str, str] = dataclasses.field(default_factory=dict)

    def remedy(self, limit: str) -> str:
        return self.remedies.get(limit, "")


@dataclasses.dataclass
class Heads:
    """What the SAM heads give for R objects (R = 1 for a prompt), as host arrays."""

    low_res: np.ndarray | None  # [R, 4g, 4g] logits; None for a mask prompt (the mask is its output)
    obj_ptr: np.ndarray  # [R, C]
    object_score: np.ndarray  # [R]
    iou: np.ndarray  # [R]
    presence: np.ndarray | None = None  # [R] (tracked frames)


class Engine(Protocol):
    """The compute a `TrackingSession` drives. `Frame` and `Bank` are the engine's own types: the
    session keeps them and hands them back, never looks inside.

    `prompt_top` is called only where a state's objects span several banks (`limits.bank_rows`
    below the objects tracked); an engine whose banks hold all its objects needs none.
    """

    limits: Limits
    timings: dict[str, float]  # operation -> milliseconds so far; the session adds "frames", "resize"

    def stream_frame(self, frame: np.ndarray) -> tuple[Any, tuple[int, int]]:
        """A stream's frame (`[H, W, 3]` uint8 RGB, or what else the engine takes) -> (what the
        stream keeps of it, (H, W) of its masks)."""
        ...

    def frame(self, kept: Any) -> Any:
        """What a video source gives for a frame, or a stream kept of it -> the operations' frame."""
        ...

    def mask_prompt(self, frame: Any, mask: np.ndarray) -> Heads:
        """A mask `[16g, 16g]` in [0, 1] for one object -> its heads (no low-res logits)."""
        ...

    def click_prompt(
        self,
        frame: Any,
        coords: np.ndarray,
        labels: np.ndarray,
        previous: np.ndarray | None,
        multimask: bool,
    ) -> Heads:
        """Clicks `[P, 2]` (input-image pixels), labels `[P]`, the object's previous logits on the
        frame `[4g, 4g]` or None, for one object -> its heads."""
        ...

    def new_bank(self, rows: int, layout: BankLayout) -> Any:
        """A zeroed bank of `rows` objects laid out as `layout`."""
        ...

    def grow_bank(self, bank: Any, rows: int, new_slots: int, at: int) -> Any:
        """`bank` with zeroed rows up to `rows` and `new_slots` zeroed slots inserted before slot `at`."""
        ...

    def prompt_top(self, frame: Any, low_res: np.ndarray, prompted: np.ndarray) -> tuple[Any, Any]:
        """Per pixel, the highest prompted logit of the rows `[R, 4g, 4g]` and its row."""
        ...

    def prompt_memory(
        self,
        frame: Any,
        bank: Any,
        low_res: np.ndarray,
        scores: np.ndarray,
        obj_ptr: np.ndarray,
        prompted: np.ndarray,
        slots: np.ndarray,
        top: Any | None,
    ) -> Any:
        """The memories of a prompted frame for the `prompted` rows `[R]` (logits `[R, 4g, 4g]`, object
        scores `[R]`, pointers `[R, C]`) written at conditioning `slots` `[R]` -> the bank. `top`: the
        per-pixel top row over every bank (`prompt_top`), None where this bank holds every object."""
        ...

    def track_step(self, frame: Any, bank: Any, reads: dict[str, np.ndarray]) -> tuple[Heads, Any]:
        """Every row tracked one frame through the memories `reads` selects (`MemorySchedule.select`,
        rows padded to the bank's) -> (their heads, the bank with the tracked rows' memories written)."""
        ...
