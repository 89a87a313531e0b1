"""The upstream PyTorch references (the `sam3` package) for parity tests, on any machine.

Importing this module skips the calling test module when torch or sam3 is missing.
Weights are drawn fresh on every run; the seed is printed so a failure can be replayed with
`ES3_TEST_SEED=<seed>`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam3")

from es3_jax import weights  # noqa: E402
from porting.upstream import build_neck, build_tracker, randomize_  # noqa: E402, F401


def fresh_seed() -> int:
    seed = int(os.environ.get("ES3_TEST_SEED", secrets.randbits(31)))
    print(f"[es3 test seed {seed}]")
    return seed


def sam3_checkpoint_dict(tracker: torch.nn.Module, neck: torch.nn.Module | None = None) -> dict:
    """A state dict in the `sam3.pt` layout (`tracker.*`, `detector.backbone.vision_backbone.*`)."""
    model = {f"tracker.{k}": v.detach().clone() for k, v in tracker.state_dict().items()}
    if neck is not None:
        for k, v in neck.sam2_convs.state_dict().items():
            model[f"detector.backbone.vision_backbone.sam2_convs.{k}"] = v.detach().clone()
        for k, v in neck.convs.state_dict().items():
            model[f"detector.backbone.vision_backbone.convs.{k}"] = v.detach().clone()
    return model


def save_sam3_checkpoint(path: Path, model: dict) -> Path:
    torch.save({"model": model}, path)
    return path


def ported_reference(folder: Path, *, tracker_fn=None):
    """Fresh upstream tracker and neck, written as `folder/sam3.pt` and read back through the
    production loader -> (seed, tracker, neck, ported tracker params).

    `tracker_fn(tracker)` may adjust the upstream tracker's weights before they are saved.
    """
    seed = fresh_seed()
    tracker, neck = build_tracker(seed), build_neck(seed)
    if tracker_fn is not None:
        tracker_fn(tracker)
    path = save_sam3_checkpoint(Path(folder) / "sam3.pt", sam3_checkpoint_dict(tracker, neck))
    return seed, tracker, neck, weights.load(path).tracker


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def nchw_to_nhwc(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(to_numpy(t).transpose(0, 2, 3, 1))


# Logits that can all lie near 0 (an object score whose bias was shifted to split a batch) are
# measured on the scale of a logit, not their own: below |logit| 1 the sigmoid is near-linear, and
# max|ref| of two numbers near 0 is no scale for the round-off of the sums that made them.
LOGIT_SCALE = 1.0


def relative_error(ours, ref, floor: float = 0.0) -> float:
    """max|ours - ref| / max(max|ref|, floor), the parity figure the test suite reports."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != upstream {ref.shape}"
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), floor, 1e-30))


def mask_iou(logits: np.ndarray, ref_logits: np.ndarray, rtol: float) -> float:
    """IoU of the two binarised masks `[H, W]` over the pixels whose reference logit is farther from 0
    than `rtol` of its largest magnitude: within that band, logits equal to `rtol` may differ in
    sign, so a fresh seed now and then flips a pixel or two there."""
    decided = np.abs(ref_logits) > rtol * np.abs(ref_logits).max()
    a, b = (logits > 0) & decided, (ref_logits > 0) & decided
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# Every figure measured in this session: printed at the end of the run by tests/conftest.py, and
# written where ES3_PARITY_FIGURES says (`tests/parity_sweep.py` collects them over many seeds).
PARITY_FIGURES: list[dict] = []


def _record(name: str, error: float, tolerance: float) -> None:
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    PARITY_FIGURES.append({"test": test, "name": name, "error": error, "tolerance": tolerance})


def report(name: str, ours, ref, tol: float, *, floor: float = 0.0) -> float:
    """Record, print and check one parity figure (`floor`: the smallest scale it is measured on)."""
    err = relative_error(ours, ref, floor)
    _record(name, err, tol)
    print(f"[parity] {name}: relative error {err:.3e} (tolerance {tol:.0e})")
    assert err <= tol, f"{name}: relative error {err:.3e} exceeds {tol:.0e}"
    return err


def report_iou(name: str, iou: float, minimum: float) -> float:
    """Record, print and check a binarised-mask IoU against its minimum (recorded as 1 − IoU)."""
    _record(f"{name} (1 - IoU)", 1.0 - iou, 1.0 - minimum)
    print(f"[parity] {name}: IoU {iou:.6f} (minimum {minimum})")
    assert iou >= minimum, f"{name}: IoU {iou:.6f} below {minimum}"
    return iou
