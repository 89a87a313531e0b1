"""Training: losses, optimiser, sharding, checkpoints, the trainer."""
