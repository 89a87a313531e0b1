"""What the `es3 train` run tests share: the micro geometry, a small synthetic store, and the
environment of an `es3` subprocess."""

import os
from collections.abc import Sequence
from pathlib import Path

from es3_jax import config as config_lib
from es3_jax import embed, weights
from es3_jax.data.synthetic import make_synthetic
from tests.flags import xla_flags

REPO = Path(__file__).resolve().parents[2]

# 56 px frames -> a 4 × 4 grid, a 1-block trunk of width 16: every step is a fraction of a second.
MICRO = [
    "MODEL.TEACHER.IMAGE_SIZE", "56", "MODEL.TEACHER.TRUNK_DIM", "16", "MODEL.TEACHER.D_MODEL", "32",
    "MODEL.TEACHER.MEM_DIM", "16", "MODEL.TEACHER.MEMORY_ATTENTION_FFN_DIM", "64",
    "MODEL.TEACHER.DECODER_MLP_DIM", "64", "MODEL.TEACHER.DECODER_HEADS", "4",
    "MODEL.TRUNK.WIDTH", "16", "MODEL.TRUNK.NUM_HEADS", "2", "MODEL.TRUNK.MLP_DIM", "32", "MODEL.TRUNK.DEPTH", "1",
    "MODEL.TRUNK.GLOBAL_BLOCKS", "[0]", "MODEL.TRUNK.WINDOW_SIZE", "4", "MODEL.TRUNK.PRETRAIN_IMAGE_SIZE", "56",
    "MODEL.PERCEIVER.NUM_LATENTS", "4", "MODEL.PERCEIVER.NUM_LATENTS_2D", "4", "MODEL.PERCEIVER.WINDOW_SIZE", "2",
    "DATA.NUM_FRAMES", "3", "DATA.MAX_OBJECTS", "2", "DATA.NUM_WORKERS", "0", "DATA.VAL_VIDEOS", "2",
    "DATA.EMBEDDING_DTYPE", "float32", "TRAIN.BATCH_SIZE", "2", "TRAIN.EFFECTIVE_BATCH_SIZE", "2",
    "TRAIN.MAX_STEPS", "20", "TRAIN.WARMUP_STEPS", "2", "TRAIN.SAVE_EVERY", "10", "TRAIN.EVAL_EVERY", "0",
    "LOG.EVERY", "1", "LOG.TENSORBOARD", "False",
]  # fmt: skip


# One layer in every stack (memory attention, decoder, perceiver): every kind of module is still
# there, and a train step compiles in two thirds of the time. For tests whose property does not
# depend on depth (sharding, remat, precision, gradients, the compiled plan).
LIGHT = [
    *("MODEL.TEACHER.MEMORY_ATTENTION_LAYERS", "1", "MODEL.TEACHER.DECODER_DEPTH", "1"),
    *("MODEL.MEMORY_ATTENTION.NUM_LAYERS", "1", "MODEL.PERCEIVER.DEPTH", "1"),
]


def synthetic_store(root: Path, videos: int, overrides: Sequence[str]) -> list[str]:
    """Write `videos` synthetic SA-V videos (8 frames of 80 × 64) under `root/data` and their store
    under `root/emb` with `es3 embed`; returns `overrides` extended with both paths."""
    make_synthetic(root / "data", videos, num_frames=8, height=64, width=80)
    overrides = [*overrides, "DATA.SAV_ROOT", str(root / "data"), "DATA.EMBEDDING_DIR", str(root / "emb")]
    cfg = config_lib.load(None, overrides)
    trunk = weights.load(None, cfg, parts=(weights.TRUNK,))
    embed.run(cfg, str(root / "data"), str(root / "emb"), weights=trunk, progress=False)
    return overrides


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of an `es3` subprocess on CPU: this one without its JAX settings and its 8 fake
    devices but with its compilation cache and compile speed, the repository importable, plus
    `extra`."""
    keep = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k in keep}
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(), "PYTHONPATH": str(REPO), **extra}
