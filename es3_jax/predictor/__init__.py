"""Video tracking for users: `VideoPredictor` (the SAM2/SAM3 predictor API), the frame sources it
reads, the prompt and stream handling it shares with the ONNX driver, and the `es3 track` job
(`track_job`).

`VideoPredictor` and its state types load on first use: the prompts and the stream are plain host
code, which the ONNX driver imports without the predictor's models, weights loading and jax.
"""

__all__ = ["PredictorError", "Prompt", "State", "VideoPredictor"]


def __getattr__(name: str):
    if name in __all__:
        from es3_jax.predictor import video_predictor  # jax, the models and weights loading

        return getattr(video_predictor, name)
    raise AttributeError(f"module 'es3_jax.predictor' has no attribute {name!r}")
