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
from tests.figures import (  # noqa: E402, F401  (the parity tests' figures, reached as upstream.report etc.)
    LOGIT_SCALE,
    REORDERED,
    mask_iou,
    relative_error,
    report,
    report_iou,
    softmax_tolerance,
)


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
