"""Deployment outside JAX: the tracker exported as static-shape ONNX graphs (`onnx_export`, which
needs jax and jax2onnx), the engine that runs them on onnxruntime (`onnx_engine`) and the tracking
session over it (`onnx_tracker`), which import neither jax nor torch; `manifest` is the contract
between the export and the engine."""
