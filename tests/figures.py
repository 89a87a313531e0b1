"""The figures a numerical test measures: relative errors on a stated scale, tolerances derived from
the computation's conditioning, and the record `tests/conftest.py` prints and `tests/parity_sweep.py`
sweeps. Needs neither torch nor the upstream packages (`tests/upstream.py` re-exports it for the
parity tests)."""

from __future__ import annotations

import math
import os

import numpy as np

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


FLOAT32_EPS = float(np.finfo(np.float32).eps)

# Two float32 evaluations of one quantity from unit-scale inputs, in programs shaped, batched, sharded
# or fused differently (so their sums run in other orders, on this processor or another's kernels),
# agree to this relative error. Their figures stay below 1e-6 here and on an emulated AVX2 processor
# (`make parity-sweep MARKER=numerics`); the margin is for processors neither of those is.
REORDERED = 1e-5


def softmax_tolerance(largest_logit: float, *, reduction: int, layers: int = 1) -> float:
    """The relative error two float32 evaluations of a softmax attention may differ by when they sum in
    different orders (other shapes, padding, batching, another CPU's kernels): equal in exact
    arithmetic, unequal in float32.

    A sum of `reduction` float32 products carries about sqrt(reduction)·eps of relative rounding (the
    probabilistic bound: errors of random sign add like a random walk), the softmax hands a logit's
    error on to its output in proportion to the logit's magnitude (never below 1: the weighted sum of
    the values rounds too), and each attention layer adds its own.
    """
    return FLOAT32_EPS * max(largest_logit, 1.0) * math.sqrt(reduction) * layers


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


def check(name: str, err: float, tol: float) -> float:
    """Record, print and check one figure already measured."""
    _record(name, err, tol)
    print(f"[parity] {name}: relative error {err:.3e} (tolerance {tol:.0e})")
    assert err <= tol, f"{name}: relative error {err:.3e} exceeds {tol:.0e}"
    return err


def report(name: str, ours, ref, tol: float, *, floor: float = 0.0) -> float:
    """Record, print and check one parity figure (`floor`: the smallest scale it is measured on)."""
    return check(name, relative_error(ours, ref, floor), tol)


def report_iou(name: str, iou: float, minimum: float) -> float:
    """Record, print and check a binarised-mask IoU against its minimum (recorded as 1 − IoU)."""
    _record(f"{name} (1 - IoU)", 1.0 - iou, 1.0 - minimum)
    print(f"[parity] {name}: IoU {iou:.6f} (minimum {minimum})")
    assert iou >= minimum, f"{name}: IoU {iou:.6f} below {minimum}"
    return iou
