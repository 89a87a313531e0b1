"""Data: frames, SA-V/DAVIS annotations, the embedding store, clip sampling, the grain pipeline."""
