"""SAM3 checkpoints' state dicts -> es3 parameter trees, strictly, through the key tables.

Layouts (a file is read and told apart once, into its parts, by `porting.checkpoint_contents`):
* Meta's `sam3.pt`: `tracker.*` and `detector.*` keys;
* a stage-1 merged checkpoint: the same layout with a different (student) trunk under
  `detector.backbone.vision_backbone.trunk.*` (`porting.stage1_checkpoint` ports that one);
* a transformers `Sam3TrackerVideoModel` state dict, translated into the sam3.pt layout first;
* an es3 merged export: the sam3.pt layout with the student's memory path
  (`tracker.transformer.encoder.*` of any depth, `tracker.spatial_perceiver.*`).

One function, `port_state_dict`, maps keys through a table; the tracker, the student and the trunk
are each that function with their table. Within a table's namespaces every key must be mapped or
explicitly ignored, and every expected parameter present with its shape: all violations are
listed in one `ParamMismatchError` that names the torch keys, and nothing is returned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flax import nnx

from es3_jax.models.trunk import ViTTrunk
from es3_jax.params import abstract_shapes, check_shapes, flatten, unflatten
from porting.checkpoint_file import CheckpointError, as_numpy
from porting.keymap import (
    SAM3_POINT_EMBED,
    STUDENT_TABLE,
    TRANSFORMERS_ALIASES,
    TRANSFORMERS_POINT_EMBED,
    TRANSFORMERS_TABLE,
    TRANSFORMERS_TRUNK_PREFIXES,
    TRANSFORMERS_TRUNK_QKV,
    TRANSFORMERS_TRUNK_TABLE,
    TRUNK_TABLE,
    KeyTable,
)

TRUNK_PREFIX = "detector.backbone.vision_backbone.trunk."
STUDENT_PREFIXES = ("tracker.transformer.encoder.", "tracker.spatial_perceiver.")


@dataclass
class PortResult:
    """What a port produced: es3 parameters, how many tensors it read and the keys it ignored."""

    params: dict  # nested, keyed by es3 path segments (ints for list indices)
    source: str
    consumed: int = 0
    ignored: list[str] = field(default_factory=list)


def transformers_to_sam3(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Rename a transformers `Sam3TrackerVideoModel` state dict into the sam3.pt layout.

    Keys transformers has and sam3.pt has not (the trunk, in another naming) keep their names.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        value = as_numpy(value)
        if key in TRANSFORMERS_ALIASES:
            twin = TRANSFORMERS_ALIASES[key]
            if twin in sd and not np.array_equal(as_numpy(sd[twin]), value):
                raise CheckpointError(f"{key} differs from {twin}; they must be the same tensor")
            if twin in sd:
                continue
            key = twin
        if key == TRANSFORMERS_POINT_EMBED:
            for k in range(value.shape[0]):
                out[SAM3_POINT_EMBED.format(k=k)] = value[k : k + 1]
            continue
        out[TRANSFORMERS_TABLE.forward(key) or key] = value
    return out


def sam3_to_transformers(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `transformers_to_sam3` for the tracker and neck keys (others are dropped)."""
    out: dict[str, np.ndarray] = {}
    points = {}
    for key, value in sd.items():
        for k in range(4):
            if key == SAM3_POINT_EMBED.format(k=k):
                points[k] = value
                break
        else:
            renamed = TRANSFORMERS_TABLE.backward(key)
            if renamed is not None:
                out[renamed] = value
    if points:
        out[TRANSFORMERS_POINT_EMBED] = np.concatenate([points[k] for k in sorted(points)], axis=0)
    for alias, twin in TRANSFORMERS_ALIASES.items():
        if twin in out:
            out[alias] = out[twin]
    return out


def _shapes(
    sd: Mapping[str, Any], table: KeyTable, expected: Mapping[str, tuple[int, ...]] | None
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]], list[str]]:
    """(torch shapes found in `table`'s namespaces, the torch shapes wanted, ignored keys): see
    `port_state_dict`."""
    found: dict[str, tuple[int, ...]] = {}
    ignored: list[str] = []
    for key in sorted(sd):
        if not table.consumes(key):
            continue
        if table.is_ignored(key):
            ignored.append(key)
        else:
            found[key] = tuple(sd[key].shape)
    want = {}
    if expected is None:
        # Each parameter through its canonical key: an alias of the same parameter is unexpected.
        for key, shape in found.items():
            hit = table.to_jax(key)
            if hit is not None and table.to_torch(hit[0])[0] == key:
                want[key] = shape
    else:
        for path, shape in expected.items():
            hit = table.to_torch(path)
            if hit is None:
                raise ValueError(f"the key table has no torch key for es3 parameter {path}")
            key, transform = hit
            want[key] = transform.torch_shape(tuple(shape))
    return found, want, ignored


def check_state_dict(
    sd: Mapping[str, Any],
    *,
    table: KeyTable,
    expected: Mapping[str, tuple[int, ...]],
    source: str,
    what: str,
) -> None:
    """`port_state_dict`'s strict check alone, converting nothing: ParamMismatchError titled
    "<source>: <what>" unless the keys of `sd` in `table`'s namespaces are exactly the torch keys
    of `expected` with their torch shapes."""
    found, want, _ = _shapes(sd, table, expected)
    check_shapes(found, want, f"{source}: {what}")


def port_state_dict(
    sd: Mapping[str, Any],
    *,
    table: KeyTable,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    source: str = "<state dict>",
    what: str = "checkpoint does not match the SAM3 tracker es3 expects",
) -> PortResult:
    """Map the keys of `sd` in `table`'s namespaces into es3 parameters (values: tensors or arrays).

    With `expected` (`{es3 path: shape}`) the keys must be exactly the torch keys of those
    parameters with the matching torch shapes; without it, every key the table maps is taken as it
    is. Ignored keys are listed; keys outside the namespaces are left alone (what a file holds
    besides: `porting.checkpoint_contents`).
    """
    found, want, ignored = _shapes(sd, table, expected)
    check_shapes(found, want, f"{source}: {what}")
    flat = {}
    for key in want:
        path, transform = table.to_jax(key)
        flat[path] = transform.to_jax(as_numpy(sd[key]))
    return PortResult(unflatten(flat), source, len(flat), ignored)


def port_student(sd: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], source: str) -> dict:
    """The student's memory path of a merged export (`tracker.transformer.encoder.*`,
    `tracker.spatial_perceiver.*`) against the student its record describes, strictly."""
    student = {k: v for k, v in sd.items() if k.startswith(STUDENT_PREFIXES)}
    what = "the student keys do not match the student its record describes"
    return port_state_dict(student, table=STUDENT_TABLE, expected=expected, source=source, what=what).params


def student_to_torch(params: Mapping) -> dict[str, np.ndarray]:
    """es3 student params (`{"memory_attention": ..., "spatial_perceiver": ...}`) -> export keys (`tracker.*`)."""
    out: dict[str, np.ndarray] = {}
    for path, value in flatten(params).items():
        hit = STUDENT_TABLE.to_torch(path)
        if hit is None:
            raise CheckpointError(f"no export key for student parameter {path}")
        key, transform = hit
        out[key] = transform.to_torch(np.asarray(value))
    return out


# --- The ViT trunk --------------------------------------------------------------------------------


def transformers_trunk_to_sam3(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The transformers trunk keys of `sd` (see `TRANSFORMERS_TRUNK_PREFIXES`) in the sam3.pt layout.

    q/k/v projections are fused into `qkv`; the position table gets back the class-token row it
    lacks, as zeros (the port drops that row again: the ViT never uses it).
    """
    prefix = next((p for p in TRANSFORMERS_TRUNK_PREFIXES if any(k.startswith(p) for k in sd)), None)
    if prefix is None:
        return {}
    out: dict[str, np.ndarray] = {}
    split: dict[str, dict[str, np.ndarray]] = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        value = as_numpy(value)
        name = key.removeprefix(prefix)
        renamed = TRANSFORMERS_TRUNK_TABLE.forward(name) or name
        module, _, leaf = renamed.rpartition(".")
        head, _, proj = module.rpartition(".")
        if proj in TRANSFORMERS_TRUNK_QKV and head.endswith(".attn"):
            split.setdefault(f"{head}.qkv.{leaf}", {})[proj] = value
            continue
        if renamed == "pos_embed":
            value = np.concatenate([np.zeros_like(value[:, :1]), value], axis=1)
        out[TRUNK_PREFIX + renamed] = value
    for fused, parts in split.items():
        if set(parts) == set(TRANSFORMERS_TRUNK_QKV):
            out[TRUNK_PREFIX + fused] = np.concatenate([parts[p] for p in TRANSFORMERS_TRUNK_QKV], axis=0)
        else:  # an incomplete triple stays visible, under its own names, as unexpected keys
            for p, v in parts.items():
                out[TRUNK_PREFIX + fused.replace(".qkv.", f".{p}.")] = v
    return out


def _checkpoint_trunk_shapes(trunk: Mapping[str, Any], source: str) -> dict[str, tuple[int, ...]]:
    """`{trunk.<path>: shape}` of the ViT whose geometry the checkpoint's own tensors give."""
    probes = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
    absent = [TRUNK_PREFIX + k for k in probes if k not in trunk]
    if absent:
        raise CheckpointError(
            f"{source}: the ViT trunk lacks the keys that give its geometry: {', '.join(absent)}"
        )
    width, _, patch, _ = trunk["patch_embed.proj.weight"].shape
    grid = round((trunk["pos_embed"].shape[1] - 1) ** 0.5)
    depth = 1 + max(int(i) for k in trunk if k.startswith("blocks.") and (i := k.split(".")[1]).isdigit())
    mlp_dim = trunk["blocks.0.mlp.fc1.weight"].shape[0]
    try:
        shapes = abstract_shapes(
            lambda: ViTTrunk(
                patch, patch, width, depth, 1, mlp_dim, 1, (depth - 1,), grid * patch, rngs=nnx.Rngs(0)
            )
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: the ViT trunk's tensors give no valid geometry: {e}") from e
    return {f"trunk.{p}": s for p, s in shapes.items()}


def port_trunk(
    sd: Mapping[str, Any],
    *,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    source: str = "<state dict>",
) -> dict:
    """The SAM3 ViT trunk of a state dict as nested es3 parameters of `ViTTrunk`, strictly.

    Keys: sam3.pt's `detector.backbone.vision_backbone.trunk.*`, or transformers'
    `[detector_model.]vision_encoder.backbone.*`. `expected`: `{path inside the trunk: shape}`, e.g.
    `abstract_shapes(lambda: trunk_from_config(cfg))`; without it, the geometry is read from the
    checkpoint itself (depth, widths, patch, pretraining grid) and every block must be complete
    and consistent with it. A checkpoint without a trunk or with a foreign one (a stage-1
    student backbone) is a `CheckpointError`. The complex RoPE buffers (`attn.freqs_cis`) are
    skipped: they are recomputed.
    """
    if any(k.startswith(TRUNK_PREFIX) for k in sd):
        trunk_sd = {k: v for k, v in sd.items() if k.startswith(TRUNK_PREFIX)}
    else:
        trunk_sd = transformers_trunk_to_sam3(sd)
    if not trunk_sd:
        raise CheckpointError(
            f"{source}: no trunk in this checkpoint (no key under {TRUNK_PREFIX} nor the transformers "
            f"{' / '.join(TRANSFORMERS_TRUNK_PREFIXES)}); frames need SAM3's ViT weights, e.g. sam3.pt"
        )
    known = [k for k in trunk_sd if TRUNK_TABLE.to_jax(k) is not None or TRUNK_TABLE.is_ignored(k)]
    if 2 * len(known) < len(trunk_sd):
        examples = ", ".join(sorted(set(trunk_sd) - set(known))[:3])
        raise CheckpointError(
            f"{source}: the trunk is not SAM3's ViT ({len(trunk_sd) - len(known)} of {len(trunk_sd)} keys "
            f"under {TRUNK_PREFIX} do not fit it, e.g. {examples}); a stage-1 student backbone? "
            "Embeddings for the tracker need the SAM3 ViT trunk"
        )
    if expected is None:
        relative = {k.removeprefix(TRUNK_PREFIX): v for k, v in trunk_sd.items()}
        full = _checkpoint_trunk_shapes(relative, source)
    else:
        full = {f"trunk.{p}": s for p, s in expected.items()}
    what = "the checkpoint's trunk does not match the SAM3 ViT es3 expects"
    result = port_state_dict(trunk_sd, table=TRUNK_TABLE, expected=full, source=source, what=what)
    return result.params["trunk"]
