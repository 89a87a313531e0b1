"""Seed-compatible entry point: merge the trained stage-2 modules into SAM3 or a stage-1 model.

`python scripts/convert_memory_weights_stage2.py --stage2_weights output/stage2_memory/ckpt_best
--sam3_weights sam3_checkpoints/sam3.pt --output_path output/efficient_sam3_full.pt` runs
`es3 export` with the same flags (also `--format pt|safetensors`, `--overwrite`, `--config`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    from es3_jax.cli import main

    sys.exit(main(["export", *sys.argv[1:]]))
