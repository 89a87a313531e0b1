"""Flax NNX modules of the SAM3 tracker and the es3 student, one file per component; the memory
modules they share are `es3_jax.memory`."""
