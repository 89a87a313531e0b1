"""Multi-process start-up: one call that every entry point makes before touching JAX devices.

A run is multi-process when the environment says so: SLURM with more than one task
(`SLURM_NTASKS`), Open MPI (`OMPI_COMM_WORLD_SIZE`), or the explicit coordinator variables
`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (and optionally
`JAX_LOCAL_DEVICE_IDS`, comma-separated). Otherwise nothing is initialised and the same code runs as
a single process.
"""

from __future__ import annotations

import os

import jax

from es3_jax.errors import Es3Error

COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _explicit_args() -> dict | None:
    present = [v for v in COORDINATOR_VARS if os.environ.get(v)]
    if not present:
        return None
    if len(present) != len(COORDINATOR_VARS):
        missing = sorted(set(COORDINATOR_VARS) - set(present))
        raise Es3Error(f"multi-process run: {', '.join(present)} set but {', '.join(missing)} missing")
    try:
        args = {
            "coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"],
            "num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
            "process_id": int(os.environ["JAX_PROCESS_ID"]),
        }
    except ValueError as e:
        raise Es3Error(f"JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers: {e}") from None
    if ids := os.environ.get("JAX_LOCAL_DEVICE_IDS"):
        args["local_device_ids"] = [int(i) for i in ids.split(",")]
    return args


def _launched_by_scheduler() -> bool:
    return (
        int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )


def initialize(timeout_s: int = 300) -> tuple[int, int]:
    """Join the other processes of this run, if there are any -> (process_index, process_count).

    Safe to call more than once. Must run before the first use of JAX devices in the process.
    """
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    args = _explicit_args()
    if args is not None and args["num_processes"] > 1:
        jax.distributed.initialize(**args, initialization_timeout=timeout_s)
    elif args is None and _launched_by_scheduler():
        jax.distributed.initialize(initialization_timeout=timeout_s)
    return jax.process_index(), jax.process_count()
