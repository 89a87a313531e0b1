"""Seed-compatible entry point: `python scripts/save_video_embeddings_stage2.py --data_dir ... --output_dir ...`.

Takes the seed's flags (`--data_dir`, `--output_dir`, `--batch_size`) plus `--sam3_weights`,
`--config` and trailing `KEY VALUE` overrides, and runs `es3 embed` with them. Under `torchrun`
(RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK set) each worker joins a JAX multi-process
run with one local device, its coordinator on MASTER_PORT + 1 (torchrun's agent holds MASTER_PORT).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _torchrun_to_jax_env() -> None:
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) <= 1 or "JAX_COORDINATOR_ADDRESS" in env:
        return
    env["JAX_COORDINATOR_ADDRESS"] = f"{env['MASTER_ADDR']}:{int(env['MASTER_PORT']) + 1}"
    env["JAX_NUM_PROCESSES"] = env["WORLD_SIZE"]
    env["JAX_PROCESS_ID"] = env["RANK"]
    env.setdefault("JAX_LOCAL_DEVICE_IDS", env.get("LOCAL_RANK", "0"))


if __name__ == "__main__":
    _torchrun_to_jax_env()
    from es3_jax.cli import main

    sys.exit(main(["embed", *sys.argv[1:]]))
