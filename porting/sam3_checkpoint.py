"""Read SAM3 tracker weights from PyTorch checkpoints into es3 parameter trees, strictly.

Accepted inputs:
* Meta's `sam3.pt`: `ckpt["model"]` with `tracker.*` and `detector.*` keys;
* a stage-1 merged checkpoint: the same layout with a different (student) trunk under
  `detector.backbone.vision_backbone.trunk.*`: the tracker and neck are ported, the trunk is
  reported as foreign;
* a transformers `Sam3TrackerVideoModel` state dict (`.safetensors` file or a folder holding
  `model.safetensors`), translated into the sam3.pt layout first.

`.pt` files are read with `torch.load(weights_only=True)`: no code runs from a checkpoint.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from es3_jax.errors import Es3Error
from es3_jax.params import unflatten
from porting.keymap import (
    SAM3_POINT_EMBED,
    TRACKER_TABLE,
    TRANSFORMERS_ALIASES,
    TRANSFORMERS_POINT_EMBED,
    TRANSFORMERS_TABLE,
    KeyTable,
)

TRUNK_PREFIX = "detector.backbone.vision_backbone.trunk."
SAM3_TRUNK_PROBE = (f"{TRUNK_PREFIX}blocks.31.attn.qkv.weight", (3072, 1024))

# Where keys es3 does not use come from, for the report (first matching prefix wins).
_UNUSED_GROUPS = (
    (TRUNK_PREFIX, "trunk"),
    ("detector.backbone.vision_backbone.convs.", "detector neck"),
    ("detector.backbone.language_backbone.", "text encoder"),
    ("detector.", "detector heads"),
    ("vision_encoder.backbone.", "trunk"),
)


class CheckpointError(Es3Error):
    """A checkpoint that cannot be read or does not fit es3; the message names the file and keys."""


@dataclass
class PortResult:
    """What a port produced: es3 parameters and an account of every key of the source."""

    params: dict  # nested, keyed by es3 path segments (ints for list indices)
    source: str
    layout: str  # "sam3" or "transformers"
    trunk: str  # "sam3-vit", "foreign", or "absent"
    consumed: int = 0
    ignored: list[str] = field(default_factory=list)
    unused: dict[str, int] = field(default_factory=dict)  # group -> number of keys

    def summary(self) -> dict:
        return {
            "source": self.source,
            "layout": self.layout,
            "trunk": self.trunk,
            "consumed_keys": self.consumed,
            "ignored_keys": self.ignored,
            "unused_keys": self.unused,
        }


def _to_numpy(value) -> np.ndarray:
    import torch

    if value.dtype == torch.bfloat16 or value.dtype == torch.float16:
        value = value.float()
    return value.detach().cpu().numpy()


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a `.pt`/`.pth` or `.safetensors` checkpoint (or a folder with `model.safetensors`)."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if not candidates:
            raise CheckpointError(f"{path}: folder holds no .safetensors file")
        sd: dict[str, np.ndarray] = {}
        for file in candidates:
            sd.update(read_state_dict(file))
        return sd
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
        return {k: _to_numpy(v) for k, v in tensors.items()}
    import torch

    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {e}") from e
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("model"), Mapping):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (or {{'model': state dict}}), got {type(ckpt)}")
    out = {}
    for k, v in ckpt.items():
        if isinstance(v, torch.Tensor):
            out[k] = _to_numpy(v)
    return out


def detect_layout(sd: Mapping[str, np.ndarray]) -> str:
    if any(k.startswith(("tracker.", "detector.")) for k in sd):
        return "sam3"
    if any(k.startswith(("memory_attention.", "mask_decoder.", "memory_encoder.")) for k in sd):
        return "transformers"
    raise CheckpointError("unrecognised checkpoint layout: neither sam3.pt (tracker.*) nor transformers keys")


def transformers_to_sam3(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename a transformers `Sam3TrackerVideoModel` state dict into the sam3.pt layout.

    Keys transformers has and sam3.pt has not (the trunk, in another naming) keep their names.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        if key in TRANSFORMERS_ALIASES:
            twin = TRANSFORMERS_ALIASES[key]
            if twin in sd and not np.array_equal(sd[twin], value):
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


def _trunk_kind(sd: Mapping[str, np.ndarray]) -> str:
    if not any(k.startswith(TRUNK_PREFIX) for k in sd):
        return "absent"
    key, shape = SAM3_TRUNK_PROBE
    return "sam3-vit" if key in sd and tuple(sd[key].shape) == shape else "foreign"


def port_state_dict(
    sd: Mapping[str, np.ndarray],
    *,
    table: KeyTable = TRACKER_TABLE,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    source: str = "<state dict>",
) -> PortResult:
    """Map a state dict through `table` into es3 parameters.

    Within the table's namespaces every key must be mapped (or explicitly ignored) and, when
    `expected` (es3 path -> shape) is given, every expected parameter must be filled with the
    right shape. All violations are raised together in one `CheckpointError`. Keys outside the
    namespaces are counted as unused.
    """
    layout = detect_layout(sd)
    if layout == "transformers":
        sd = transformers_to_sam3(sd)
    flat: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    unexpected, mismatched, ignored = [], [], []
    unused: Counter[str] = Counter()
    for key in sorted(sd):
        if not table.consumes(key):
            group = next((g for p, g in _UNUSED_GROUPS if key.startswith(p)), "other")
            unused[group] += 1
            continue
        if table.is_ignored(key):
            ignored.append(key)
            continue
        mapped = table.to_jax(key)
        if mapped is None:
            unexpected.append(key)
            continue
        path, transform = mapped
        if path in flat:
            unexpected.append(f"{key} (same parameter as {origin[path]})")
            continue
        value = np.asarray(sd[key])
        if expected is not None and path in expected:
            want = expected[path]
            if transform.jax_shape(value.shape) != tuple(want):
                torch_shape = (
                    tuple(want)
                    if transform.perm is None
                    else tuple(want[i] for i in np.argsort(transform.perm))
                )
                mismatched.append(f"{key}: shape {tuple(value.shape)}, expected {torch_shape}")
                continue
        flat[path] = transform.to_jax(value)
        origin[path] = key
    if expected is not None:
        unexpected += [f"{origin[p]} (no such es3 parameter {p})" for p in sorted(set(flat) - set(expected))]
    missing = []
    if expected is not None:
        for path in sorted(set(expected) - set(flat)):
            torch_key = table.to_torch(path)
            missing.append(torch_key[0] if torch_key else f"(es3 parameter {path})")
        # a shape mismatch is reported once, not also as missing
        bad = {m.split(":")[0] for m in mismatched}
        missing = [m for m in missing if m not in bad]
    if missing or unexpected or mismatched:
        lines = [f"{source}: checkpoint does not match the SAM3 tracker es3 expects:"]
        lines += [f"  missing key: {k}" for k in missing]
        lines += [f"  unexpected key: {k}" for k in unexpected]
        lines += [f"  shape mismatch: {k}" for k in mismatched]
        raise CheckpointError("\n".join(lines))
    return PortResult(
        params=unflatten(flat),
        source=source,
        layout=layout,
        trunk=_trunk_kind(sd),
        consumed=len(flat),
        ignored=ignored,
        unused=dict(sorted(unused.items())),
    )


def port_checkpoint(path: str | Path, expected: Mapping[str, tuple[int, ...]] | None = None) -> PortResult:
    """Read and port a checkpoint file (see the module docstring for the accepted layouts)."""
    return port_state_dict(read_state_dict(path), expected=expected, source=str(path))


def format_report(result: PortResult) -> str:
    lines = [
        f"source: {result.source} ({result.layout} layout)",
        f"ported: {result.consumed} tensors (tracker + tracker neck)",
    ]
    trunk = {
        "sam3-vit": "SAM3 ViT trunk present (read by `es3 embed`, not part of the tracker)",
        "foreign": "foreign trunk (e.g. a stage-1 student backbone): not ported",
        "absent": "no trunk in this checkpoint",
    }[result.trunk]
    lines.append(f"trunk: {trunk}")
    if result.ignored:
        lines.append(f"ignored (unused by the tracker): {', '.join(result.ignored)}")
    for group, n in result.unused.items():
        lines.append(f"unused: {n} keys of the {group}")
    return "\n".join(lines)
