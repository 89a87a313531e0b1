"""Frames of an EfficientSAM3 seed embeddings folder saved with `torch.save`: the one part of
`es3 embed --import_pt` that needs torch (`es3_jax.embed.import_seed_folder` does the rest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def read_pt_frame(path: Path) -> np.ndarray:
    """One `<stem>.pt` frame `[C, h, w]` -> float32 numpy, read with `torch.load(weights_only=True)`."""
    return torch.load(path, map_location="cpu", weights_only=True).float().numpy()
