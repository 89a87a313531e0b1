"""Video tracking for users: `VideoPredictor` (the SAM2/SAM3 predictor API), the tracking session
it is (`session`, host code over an `engine`), the frame sources it reads, and the `es3 track` job
(`track_job`).

`VideoPredictor` loads on first use: the session, the prompts and the stream are plain host code,
which the ONNX driver imports without the predictor's models, weights loading and jax.
"""

from es3_jax.predictor.prompts import PredictorError, Prompt
from es3_jax.predictor.session import State

__all__ = ["PredictorError", "Prompt", "State", "VideoPredictor"]


def __getattr__(name: str):
    if name == "VideoPredictor":
        from es3_jax.predictor.video_predictor import VideoPredictor  # jax, the models, weights loading

        return VideoPredictor
    raise AttributeError(f"module 'es3_jax.predictor' has no attribute {name!r}")
