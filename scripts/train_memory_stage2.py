"""Seed-compatible entry point: `python scripts/train_memory_stage2.py --config ... --output_dir ...`.

Takes the seed's flags (`--config`, `--output_dir`, `--resume`) and trailing `KEY VALUE` overrides
(`DATA.USE_PRECOMPUTED True`), and runs `es3 train` with them. On several hosts, start it on every
one under SLURM or with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    from es3_jax.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
