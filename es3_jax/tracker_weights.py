"""Ported SAM3 tracker weights on disk: an orbax checkpoint plus the config it belongs to.

Layout of a weights folder (what `es3 port` writes):

    <dir>/params/        orbax checkpoint of the nested parameter dict (list indices as "0", "1", ...)
    <dir>/config.yaml    the resolved es3 config (MODEL.TEACHER describes the tracker geometry)
    <dir>/port.json      where the weights came from and which source keys were not used

Reading needs neither torch nor the source checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from es3_jax import config as config_lib
from es3_jax.errors import Es3Error
from es3_jax.params import flatten, unflatten

PARAMS_DIR = "params"
CONFIG_FILE = "config.yaml"
REPORT_FILE = "port.json"


class WeightsError(Es3Error):
    """A weights folder that is missing, incomplete or unreadable; the message names the path."""


def _string_keys(tree: Mapping) -> dict:
    return {str(k): _string_keys(v) if isinstance(v, Mapping) else np.asarray(v) for k, v in tree.items()}


def save(
    output_dir: str | Path, params: Mapping, cfg: config_lib.Config, report: Mapping | None = None
) -> Path:
    """Write a weights folder. The folder appears complete or not at all: it is assembled
    under a temporary name beside `output_dir` and renamed into place. In a multi-process run one
    process calls it, with host (numpy) arrays."""
    import jax
    import orbax.checkpoint as ocp

    output_dir = Path(output_dir).absolute()
    if output_dir.exists() and any(output_dir.iterdir()):
        raise WeightsError(f"{output_dir} already exists and is not empty; choose another --output_dir")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        # One process writes the folder (process 0 of a multi-process run): orbax must not wait at
        # barriers for processes that never call this.
        me = jax.process_index()
        checkpointer = ocp.StandardCheckpointer(
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        )
        checkpointer.save(staging / PARAMS_DIR, _string_keys(params))
        checkpointer.wait_until_finished()
        config_lib.save(cfg, staging / CONFIG_FILE)
        (staging / REPORT_FILE).write_text(json.dumps(dict(report or {}), indent=2) + "\n")
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def load(weights_dir: str | Path) -> tuple[dict, config_lib.Config]:
    """Read a weights folder -> (nested params with int list indices, config)."""
    import orbax.checkpoint as ocp

    weights_dir = Path(weights_dir).absolute()
    for name in (PARAMS_DIR, CONFIG_FILE):
        if not (weights_dir / name).exists():
            raise WeightsError(f"{weights_dir}: not an es3 weights folder (missing {name})")
    cfg = config_lib.load(weights_dir / CONFIG_FILE)
    try:
        restored = ocp.StandardCheckpointer().restore(weights_dir / PARAMS_DIR)
    except Exception as e:
        raise WeightsError(f"{weights_dir / PARAMS_DIR}: unreadable orbax checkpoint: {e}") from e
    params = unflatten({k: np.asarray(v) for k, v in flatten(restored).items()})
    return params, cfg
