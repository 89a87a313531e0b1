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
    TRANSFORMERS_TRUNK_PREFIXES,
    TRANSFORMERS_TRUNK_QKV,
    TRANSFORMERS_TRUNK_TABLE,
    TRUNK_TABLE,
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


def read_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(the state dict as torch tensors, in their stored dtypes; the file's other entries) of a
    `.pt`/`.pth` (flat or `{"model": ...}`: the other top-level entries) or `.safetensors` file
    (its metadata strings). Large `.pt` files are memory-mapped."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
        return sd, meta
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        ckpt = None  # legacy (non-zip) format: cannot be memory-mapped
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {e}") from e
    if ckpt is None:
        try:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {e}") from e
    extras: dict = {}
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("model"), Mapping):
        extras = {k: v for k, v in ckpt.items() if k != "model"}
        ckpt = ckpt["model"]
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (or {{'model': state dict}}), got {type(ckpt)}")
    return dict(ckpt), extras


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a `.pt`/`.pth` or `.safetensors` checkpoint (or a folder with `model.safetensors`)."""
    import torch

    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if not candidates:
            raise CheckpointError(f"{path}: folder holds no .safetensors file")
        sd: dict[str, np.ndarray] = {}
        for file in candidates:
            sd.update(read_state_dict(file))
        return sd
    tensors, _ = read_checkpoint(path)
    return {k: _to_numpy(v) for k, v in tensors.items() if isinstance(v, torch.Tensor)}


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


# --- The ViT trunk (read by `es3 embed`) ------------------------------------------------------


def transformers_trunk_to_sam3(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
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
        name = key.removeprefix(prefix)
        renamed = TRANSFORMERS_TRUNK_TABLE.forward(name) or name
        module, _, leaf = renamed.rpartition(".")
        head, _, proj = module.rpartition(".")
        if proj in TRANSFORMERS_TRUNK_QKV and head.endswith(".attn"):
            split.setdefault(f"{head}.qkv.{leaf}", {})[proj] = np.asarray(value)
            continue
        if renamed == "pos_embed":
            value = np.asarray(value)
            value = np.concatenate([np.zeros_like(value[:, :1]), value], axis=1)
        out[TRUNK_PREFIX + renamed] = np.asarray(value)
    for fused, parts in split.items():
        if set(parts) == set(TRANSFORMERS_TRUNK_QKV):
            out[TRUNK_PREFIX + fused] = np.concatenate([parts[p] for p in TRANSFORMERS_TRUNK_QKV], axis=0)
        else:  # an incomplete triple stays visible, under its own names, as unexpected keys
            for p, v in parts.items():
                out[TRUNK_PREFIX + fused.replace(".qkv.", f".{p}.")] = v
    return out


def _checkpoint_trunk_shapes(trunk: Mapping[str, np.ndarray], source: str) -> dict[str, tuple[int, ...]]:
    """The es3 parameter shapes of the ViT whose geometry the checkpoint's own tensors give."""
    from flax import nnx

    from es3_jax.models.trunk import ViTTrunk
    from es3_jax.params import abstract_shapes

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
        return abstract_shapes(
            lambda: ViTTrunk(
                patch, patch, width, depth, 1, mlp_dim, 1, (depth - 1,), grid * patch, rngs=nnx.Rngs(0)
            )
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: the ViT trunk's tensors give no valid geometry: {e}") from e


def port_trunk(
    source: str | Path | Mapping[str, np.ndarray], *, expected: Mapping[str, tuple[int, ...]] | None = None
) -> dict:
    """The SAM3 ViT trunk of a checkpoint as nested es3 parameters of `ViTTrunk`, strictly.

    `source`: a sam3.pt-layout checkpoint (keys `detector.backbone.vision_backbone.trunk.*`), a
    transformers one (`[detector_model.]vision_encoder.backbone.*`), as a path or a state dict.
    `expected`: `{path inside the trunk: shape}`, e.g.
    `es3_jax.params.abstract_shapes(lambda: trunk_from_config(cfg))`; without it, the geometry is
    read from the checkpoint itself (depth, widths, patch, pretraining grid) and every block must
    be complete and consistent with it. Missing, unexpected and mis-shaped keys are listed together
    in one `CheckpointError`; so is a checkpoint without a trunk or with a foreign one (a stage-1
    student backbone). The complex RoPE buffers (`attn.freqs_cis`) are skipped: they are recomputed.
    """
    if isinstance(source, Mapping):
        sd, name = source, "<state dict>"
    else:
        sd, name = read_state_dict(source), str(source)
    if any(k.startswith(TRUNK_PREFIX) for k in sd):
        trunk_sd = {k: np.asarray(v) for k, v in sd.items() if k.startswith(TRUNK_PREFIX)}
    else:
        trunk_sd = transformers_trunk_to_sam3(sd)
    if not trunk_sd:
        raise CheckpointError(
            f"{name}: no trunk in this checkpoint (no key under {TRUNK_PREFIX} nor the transformers "
            f"{' / '.join(TRANSFORMERS_TRUNK_PREFIXES)}); `es3 embed` needs SAM3's ViT weights, e.g. sam3.pt"
        )
    known = [k for k in trunk_sd if TRUNK_TABLE.to_jax(k) is not None or TRUNK_TABLE.is_ignored(k)]
    if 2 * len(known) < len(trunk_sd):
        examples = ", ".join(sorted(set(trunk_sd) - set(known))[:3])
        raise CheckpointError(
            f"{name}: the trunk is not SAM3's ViT ({len(trunk_sd) - len(known)} of {len(trunk_sd)} keys "
            f"under {TRUNK_PREFIX} do not fit it, e.g. {examples}); a stage-1 student backbone? "
            "Embeddings for the tracker need the SAM3 ViT trunk"
        )
    if expected is None:
        relative = {k.removeprefix(TRUNK_PREFIX): v for k, v in trunk_sd.items()}
        expected = _checkpoint_trunk_shapes(relative, name)
    jax_prefix = TRUNK_TABLE.components[0].jax_prefix
    flat: dict[str, np.ndarray] = {}
    unexpected, mismatched = [], []
    for key in sorted(trunk_sd):
        if TRUNK_TABLE.is_ignored(key):
            continue
        mapped = TRUNK_TABLE.to_jax(key)
        path = None if mapped is None else mapped[0].removeprefix(jax_prefix)
        if path is None or path not in expected:
            unexpected.append(key)
            continue
        transform = mapped[1]
        value = trunk_sd[key]
        if transform.jax_shape(value.shape) != tuple(expected[path]):
            want = TRUNK_TABLE.to_torch(jax_prefix + path)[1]
            mismatched.append(
                f"{key}: shape {tuple(value.shape)}, expected {_torch_shape(want, expected[path])}"
            )
            continue
        flat[path] = transform.to_jax(value)
    bad = {m.split(":")[0] for m in mismatched}
    missing = [
        k
        for p in sorted(set(expected) - set(flat))
        if (k := TRUNK_TABLE.to_torch(jax_prefix + p)[0]) not in bad
    ]
    if missing or unexpected or mismatched:
        lines = [f"{name}: the checkpoint's trunk does not match the SAM3 ViT es3 expects:"]
        lines += [f"  missing key: {k}" for k in missing]
        lines += [f"  unexpected key: {k}" for k in unexpected]
        lines += [f"  shape mismatch: {k}" for k in mismatched]
        raise CheckpointError("\n".join(lines))
    return unflatten(flat)


def _torch_shape(transform, jax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape whose JAX layout is `jax_shape` under `transform`."""
    if hasattr(transform, "torch_shape"):
        return tuple(transform.torch_shape(tuple(jax_shape)))
    if transform.perm is None:
        return tuple(jax_shape)
    return tuple(jax_shape[i] for i in np.argsort(transform.perm))
