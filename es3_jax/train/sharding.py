"""The device mesh and how parameters and batches are laid out on it.

Axes are ('data', 'fsdp'). The batch is split over both; parameters are replicated unless a rule in
`MESH.PARAM_RULES` or the `MESH.FSDP_MIN_SIZE_MB` threshold shards them over 'fsdp'. Across GPU
nodes the mesh is hybrid: 'data' spans the nodes (slow links carry only the gradient reduction)
and 'fsdp' stays inside a node.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from es3_jax.config import ConfigError, MeshConfig
from es3_jax.params import flatten, unflatten

AXES = ("data", "fsdp")
BATCH_SPEC = PartitionSpec(AXES)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes; `DATA: -1` takes every device the fsdp axis leaves."""
    fsdp = cfg.FSDP
    if fsdp < 1 or num_devices % fsdp:
        raise ConfigError(f"MESH.FSDP {fsdp} does not divide the {num_devices} devices")
    data = num_devices // fsdp if cfg.DATA == -1 else cfg.DATA
    if data * fsdp != num_devices:
        raise ConfigError(f"MESH.DATA {cfg.DATA} × MESH.FSDP {fsdp} != {num_devices} devices")
    return data, fsdp


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """The ('data', 'fsdp') mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    data, fsdp = mesh_shape(cfg, len(devices))
    types = (AxisType.Auto, AxisType.Auto)
    nodes = jax.process_count()
    if nodes > 1 and devices[0].platform == "gpu" and data % nodes == 0:
        grid = mesh_utils.create_hybrid_device_mesh((data // nodes, fsdp), (nodes, 1), devices=devices)
        return Mesh(grid, AXES, axis_types=types)
    return jax.make_mesh((data, fsdp), AXES, axis_types=types, devices=devices)


def _parse_rules(rules: tuple[str, ...]) -> list[tuple[re.Pattern, tuple[str | None, ...]]]:
    parsed = []
    for rule in rules:
        pattern, sep, spec = rule.rpartition("=")
        if not sep or not pattern:
            raise ConfigError(f"MESH.PARAM_RULES: {rule!r} is not '<regex>=<axis>,<axis>,...'")
        axes = tuple(None if a.strip() in ("_", "") else a.strip() for a in spec.split(","))
        unknown = [a for a in axes if a is not None and a not in AXES]
        if unknown:
            raise ConfigError(
                f"MESH.PARAM_RULES: {rule!r} names unknown mesh axes {unknown}; axes are {AXES}"
            )
        parsed.append((re.compile(pattern), axes))
    return parsed


def param_spec(path: str, shape: tuple[int, ...], cfg: MeshConfig, fsdp: int) -> PartitionSpec:
    """The PartitionSpec of one parameter: the first matching rule, else the size threshold."""
    for pattern, axes in _parse_rules(cfg.PARAM_RULES):
        if pattern.search(path):
            if len(axes) != len(shape):
                raise ConfigError(
                    f"MESH.PARAM_RULES: rule for {path} has {len(axes)} axes, the array {shape}"
                )
            return PartitionSpec(*axes)
    size_mb = math.prod(shape) * 4 / 2**20
    if fsdp == 1 or size_mb < cfg.FSDP_MIN_SIZE_MB:
        return PartitionSpec()
    divisible = [i for i, n in enumerate(shape) if n % fsdp == 0]
    if not divisible:
        return PartitionSpec()
    dim = max(divisible, key=lambda i: shape[i])
    return PartitionSpec(*("fsdp" if i == dim else None for i in range(len(shape))))


def param_shardings(params: Mapping, mesh: Mesh, cfg: MeshConfig) -> dict:
    """A NamedSharding for every array of a nested parameter dict (same structure)."""
    fsdp = mesh.shape["fsdp"]
    flat = {
        k: NamedSharding(mesh, param_spec(k, tuple(np.shape(v)), cfg, fsdp))
        for k, v in flatten(params).items()
    }
    return unflatten(flat)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over both mesh axes."""
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the batch -> global arrays split over the mesh (every process calls it)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def optimizer_shardings(optimizer, params: Any, param_shards: Any, mesh: Mesh) -> Any:
    """Shardings of the optimiser state: per-parameter statistics follow their parameter's
    sharding (Adam moments of an fsdp-sharded kernel are sharded alike); counters are replicated."""
    abstract = jax.eval_shape(optimizer.init, params)
    return optax.tree_map_params(
        optimizer,
        lambda _, shard: shard,
        abstract,
        param_shards,
        transform_non_params=lambda _: replicated(mesh),
    )


def init_optimizer(optimizer, params: Any, param_shards: Any, mesh: Mesh) -> tuple[Any, Any]:
    """(optimiser state placed on the mesh, its shardings)."""
    shards = optimizer_shardings(optimizer, params, param_shards, mesh)
    return jax.jit(optimizer.init, out_shardings=shards)(params), shards
