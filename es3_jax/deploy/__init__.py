"""Deployment outside JAX: the tracker exported as static-shape ONNX graphs (`onnx_export`, which
needs jax and jax2onnx) and the driver that tracks with them on onnxruntime (`onnx_tracker`, which
imports neither jax nor torch); `manifest` is the contract between the two."""
