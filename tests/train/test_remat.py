"""Gradient checkpointing (TRAIN.REMAT) changes what the backward pass keeps, never the gradients."""

import numpy as np
import pytest

from tests import figures
from tests.train.gradients import loss_and_gradients


@pytest.mark.numerics
@pytest.mark.parametrize(
    ("mode", "remat"),
    [
        ("distill", "frame"),  # the seed config's setting
        pytest.param("distill", "layer", marks=pytest.mark.slow),
        pytest.param("finetune", "frame_layer", marks=pytest.mark.slow),
    ],
)
def test_remat_gradients_equal_plain_gradients(mode, remat):
    _, plain = loss_and_gradients(mode)
    _, checkpointed = loss_and_gradients(mode, ("TRAIN.REMAT", remat))
    assert plain.keys() == checkpointed.keys()
    scale = max(np.abs(g).max() for g in plain.values())
    assert scale > 0, "the plain gradients are all zero: the test would prove nothing"
    worst = max(plain, key=lambda k: np.abs(plain[k] - checkpointed[k]).max())
    err = float(np.abs(plain[worst] - checkpointed[worst]).max() / scale)
    # The recomputed forward is fused anew inside the backward pass: the same sums, other orders.
    figures.check(
        f"TRAIN.REMAT {remat} ({mode}) gradients, of the largest, at {worst}", err, figures.REORDERED
    )
