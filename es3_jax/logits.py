"""Mask-logit conventions shared by the models and the host-side tracking code (which imports no jax)."""

# The logits of "no object": an absent object's masks, an object not started yet, the pixels a
# mask prompt leaves out (upstream's NO_OBJ_SCORE).
NO_OBJ_SCORE = -1024.0
