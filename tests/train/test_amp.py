"""TRAIN.AMP: bf16 compute with float32 parameters tracks the float32 step on the same batch."""

import numpy as np
import pytest

from es3_jax import config as config_lib
from tests.train.gradients import loss_and_gradients


def test_amp_is_bf16_compute():
    cfg = config_lib.load(None, ["TRAIN.AMP", "True"])
    assert cfg.MODEL.COMPUTE_DTYPE == "bfloat16"
    with pytest.raises(config_lib.ConfigError, match=r"TRAIN.AMP.*MODEL.COMPUTE_DTYPE"):
        config_lib.load(None, ["TRAIN.AMP", "True", "MODEL.COMPUTE_DTYPE", "float32"])


def test_bf16_loss_and_student_gradients_follow_float32():
    loss32, grads32 = loss_and_gradients("distill")
    loss16, grads16 = loss_and_gradients("distill", ("TRAIN.AMP", "True"))
    assert all(g.dtype == np.float32 for g in grads16.values()), "AMP gradients must be float32"
    flat32 = np.concatenate([g.ravel() for g in grads32.values()])
    flat16 = np.concatenate([grads16[k].ravel() for k in grads32])
    cosine = float(flat32 @ flat16 / (np.linalg.norm(flat32) * np.linalg.norm(flat16)))
    rel_loss = abs(loss16 - loss32) / abs(loss32)
    print(
        f"bf16 vs float32: loss {loss16:.5f} vs {loss32:.5f} ({rel_loss:.2%}), gradient cosine {cosine:.5f}"
    )
    assert rel_loss <= 0.02, f"bf16 loss {loss16} is {rel_loss:.2%} off the float32 loss {loss32}"
    assert cosine >= 0.99, f"bf16 student gradients: cosine {cosine:.4f} with float32's"
