"""`OnnxEngine`: a tracking session's operations as the graphs of one ONNX export, on onnxruntime.

Numpy and onnxruntime alone: no jax, no torch. The bank is a set of numpy arrays of the export's
fixed shapes (`Manifest.bank_shapes`); each graph returns the bank it wrote. What the export fixed
(image size, objects, clicks per prompt, conditioning slots) its `limits` say, with the export
flag that changes each, and an input of another shape is refused naming it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from es3_jax import config as config_lib
from es3_jax.data.frames import normalize, resize_frame
from es3_jax.deploy.manifest import BANK, CONFIG, INPUTS, NEXT_BANK, OUTPUTS, Manifest
from es3_jax.memory.schedule import BankLayout
from es3_jax.predictor.engine import Heads, Limits
from es3_jax.predictor.prompts import PredictorError

Frame = dict[str, np.ndarray]  # the image encoder's outputs, by name
Bank = dict[str, np.ndarray]  # BANK names -> arrays

_EXPORT_AGAIN = "export another with es3 export --format onnx"
# The export flag that sets each input's shape, for the error a mismatched input gets (the rest:
# the number of objects, and for the bank the conditioning slots too).
_FLAG = {
    "image": "--image_size S",
    "mask": "--image_size S",
    "point_coords": "--points P",
    "point_labels": "--points P",
    **{name: "--objects O / --cond_frames N" for name in BANK},
}
_NUMPY_DTYPE = {
    "tensor(float)": np.float32,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


class OnnxShapeError(PredictorError):
    """An input whose shape or dtype the exported graph was not built for."""


class OnnxEngine:
    """The graphs of the export in `folder` (what `es3 export --format onnx` wrote). threads:
    onnxruntime's intra-op threads (None: its default, one per core)."""

    def __init__(
        self,
        folder: str | Path,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
    ):
        self.folder = Path(folder)
        self.manifest = m = Manifest.load(self.folder)
        self.cfg = config_lib.load(self.folder / CONFIG)
        self.timings: dict[str, float] = {}
        self.limits = Limits(
            "this export",
            objects=m.objects,
            bank_rows=m.objects,
            layout=m.layout,
            refines_clicks=False,
            remedies={
                "objects": f"{_EXPORT_AGAIN} --objects O",
                "cond_slots": f"{_EXPORT_AGAIN} --cond_frames N",
                "refines_clicks": "prompt such a frame once",
            },
        )
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: jax2onnx leaves unused shape constants ORT warns of
        if threads is not None:
            options.intra_op_num_threads = threads
        self.sessions = {
            name: ort.InferenceSession(os.fspath(self.folder / file), options, providers=list(providers))
            for name, file in m.graphs.items()
        }
        for name, session in self.sessions.items():
            got = tuple(i.name for i in session.get_inputs())
            if got != INPUTS[name]:
                raise OnnxShapeError(
                    f"{self.folder / m.graphs[name]}: inputs {got}, es3 expects {INPUTS[name]}"
                )

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
            f"{m.layout.cond} conditioning slots: {_EXPORT_AGAIN} {_FLAG.get(name, '--objects O')}"
        )

    # ----------------------------------------------------------------------------------------
    # the engine's operations

    def stream_frame(self, frame: np.ndarray) -> tuple[Frame, tuple[int, int]]:
        """`[H, W, 3]` uint8 RGB, through the image encoder now."""
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
            raise PredictorError(f"a stream frame must be [H, W, 3] uint8, got {frame.dtype} {frame.shape}")
        data = self.cfg.DATA
        image = normalize(resize_frame(frame, self.manifest.image_size), data.PIXEL_MEAN, data.PIXEL_STD)
        return self.run("image_encoder", {"image": image[None]}), frame.shape[:2]

    def frame(self, kept: Frame) -> Frame:
        return kept

    def mask_prompt(self, frame: Frame, mask: np.ndarray) -> Heads:
        out = self.run("mask_prompt", {**frame, "mask": mask[None]})
        return Heads(None, out["obj_ptr"], out["object_score_logits"], out["iou_score"])

    def click_prompt(
        self,
        frame: Frame,
        coords: np.ndarray,
        labels: np.ndarray,
        previous: np.ndarray | None,
        multimask: bool,
    ) -> Heads:
        """The click graph decodes `manifest.points` clicks and takes no previous logits (the
        session refuses what needs them: `limits.refines_clicks`)."""
        if len(labels) != self.manifest.points:
            raise OnnxShapeError(
                f"{len(labels)} points (a box is 2): the export's click graph takes {self.manifest.points}; "
                f"{_EXPORT_AGAIN} --points P"
            )
        out = self.run("click_prompt", {**frame, "point_coords": coords[None], "point_labels": labels[None]})
        return Heads(out["low_res_masks"], out["obj_ptr"], out["object_score_logits"], out["iou_score"])

    def new_bank(self, rows: int, layout: BankLayout) -> Bank:
        return {name: np.zeros(shape, np.float32) for name, shape in self.manifest.bank_shapes.items()}

    def grow_bank(self, bank: Bank, rows: int, new_slots: int, at: int) -> Bank:
        raise OnnxShapeError(
            f"this export's bank is fixed at {self.manifest.objects} objects and "
            f"{self.manifest.layout.cond} conditioning slots; {_EXPORT_AGAIN} --objects O / --cond_frames N"
        )

    def prompt_memory(
        self,
        frame: Frame,
        bank: Bank,
        low_res: np.ndarray,
        scores: np.ndarray,
        obj_ptr: np.ndarray,
        prompted: np.ndarray,
        slots: np.ndarray,
        top: np.ndarray | None,
    ) -> Bank:
        """`top` is None: the bank holds every object (`limits.bank_rows`), the graph finds it."""
        inputs = {
            "low_res_masks": low_res,
            "object_score_logits": scores,
            "obj_ptr": obj_ptr,
            "prompted": prompted,
            "cond_slot": slots,
        }
        out = self.run("prompt_memory", {**frame, **inputs, **bank})
        return dict(zip(BANK, (out[name] for name in NEXT_BANK), strict=True))

    def track_step(self, frame: Frame, bank: Bank, reads: dict[str, np.ndarray]) -> tuple[Heads, Bank]:
        out = self.run("track_step", {**frame, **bank, **reads})
        heads = Heads(
            out["low_res_masks"],
            out["obj_ptr"],
            out["object_score_logits"],
            out["iou_score"],
            out["presence"],
        )
        return heads, dict(zip(BANK, (out[name] for name in NEXT_BANK), strict=True))
