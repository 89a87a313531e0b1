"""es3-jax: EfficientSAM3 stage-2 memory distillation in JAX/Flax."""

__version__ = "0.1.0"
