"""EfficientSAM3 stage-1 student trunks in PyTorch checkpoints <-> es3 `Stage1Trunk` parameters.

A stage-1 merged checkpoint is sam3.pt with its ViT trunk replaced: under
`detector.backbone.vision_backbone.trunk.model.` sit `backbone.model.*` (the RepViT, TinyViT or
EfficientViT module) and `head.*` (the 1×1 conv, BatchNorm, 3×3 conv that map it onto the ViT's
features). The tracker and its neck are SAM3's, under their usual keys. Older files put the same
two groups under other prefixes (`OLDER_PREFIXES`), and training checkpoints may carry a
`module.` or `student_trunk.` in front; keys are brought onto the merged prefix before the port.

es3's modules mirror upstream's module names, so one table per trunk kind follows from the
module itself: an es3 path is its torch key with the leaf renamed (`kernel`/`scale` <-> `weight`,
`mean`/`var` <-> `running_mean`/`running_var`) and the layout permuted (convs and linears). The
table serves both ways (`port_stage1_trunk`, `stage1_trunk_to_torch`), strictly like the
tracker's: every key must be mapped or ignored (`num_batches_tracked`), every parameter present
with its shape, and all violations come in one error.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flax import nnx

from es3_jax.config import STAGE1_TRUNK_KINDS
from es3_jax.models.stage1.stage1_trunk import Stage1Trunk, family_of
from es3_jax.params import abstract_shapes, flatten
from porting.checkpoint_file import CheckpointError
from porting.keymap import CONV, IDENTITY, LINEAR, Component, KeyTable, Rule
from porting.sam3_checkpoint import port_state_dict

STAGE1_PREFIX = "detector.backbone.vision_backbone.trunk.model."
OLDER_PREFIXES = (
    "detector.backbone.vision_backbone.trunk.",  # the stage-2 branch's converter
    "backbone.vision_backbone.trunk.model.",
    "backbone.vision_backbone.trunk.",
    "backbone.vision_backbone.student_encoder.",  # the stage-1 branch
    "image_encoder.",
    "",  # a stage-1 training checkpoint's own `{"model": {backbone.model.*, head.*}}`
)
WRAPPERS = ("module.", "student_trunk.")  # stripped, as upstream's loader does
BACKBONE = "backbone.model."
HEAD = "head."
# The family a backbone's first module names.
FAMILY_MARKERS = {"features.": "repvit", "patch_embed.": "tiny_vit", "input_stem.": "efficientvit"}

# es3 leaf -> torch leaf (kernels: by their rank).
_LEAVES = {"scale": "weight", "mean": "running_mean", "var": "running_var"}


def _torch_name(path: str, shape: tuple[int, ...]) -> Rule:
    """The rule for one es3 parameter path of `Stage1Trunk`, relative to `STAGE1_PREFIX`."""
    module, _, leaf = path.rpartition(".")
    if module.startswith("backbone."):
        module = BACKBONE + module.removeprefix("backbone.")
    transform = IDENTITY
    if leaf == "kernel":
        transform = {4: CONV, 2: LINEAR}[len(shape)]
        torch_leaf = "weight"
    else:
        torch_leaf = _LEAVES.get(leaf, leaf)
    return Rule(f"{module}.{torch_leaf}", path, transform)


@functools.cache
def _rules(kind: str, out_dim: int) -> tuple[tuple[Rule, tuple[int, ...]], ...]:
    """(rule, es3 shape) for every parameter of the kind's `Stage1Trunk` (paths relative to it)."""
    family_of(kind)
    # The parameter shapes depend on the kind and width only, not on the input size.
    shapes = abstract_shapes(lambda: Stage1Trunk(kind, 1008, 72, out_dim, rngs=nnx.Rngs(0)))
    return tuple((_torch_name(p, s), s) for p, s in sorted(shapes.items()))


def _torch_shapes(kind: str, out_dim: int) -> dict[str, tuple[int, ...]]:
    """`{torch key: torch shape}` the kind's trunk has in a merged checkpoint."""
    return {STAGE1_PREFIX + r.torch: r.transform.torch_shape(s) for r, s in _rules(kind, out_dim)}


@functools.cache
def stage1_table(kind: str, out_dim: int = 1024) -> KeyTable:
    """The key table of a stage-1 trunk kind under `STAGE1_PREFIX` (es3 paths under `trunk.`)."""
    rules = tuple(r for r, _ in _rules(kind, out_dim))
    ignored = tuple(
        r.torch.replace(".running_mean", ".num_batches_tracked") for r in rules if r.jax.endswith(".mean")
    )
    return KeyTable((Component(kind, STAGE1_PREFIX, "trunk.", rules, ignored),), (STAGE1_PREFIX,))


def _strip_wrappers(key: str) -> str:
    for wrapper in WRAPPERS:
        key = key.removeprefix(wrapper)
    return key


def stage1_keys(sd: Mapping[str, Any]) -> dict[str, str]:
    """`{key under STAGE1_PREFIX: the key of sd}` for the stage-1 trunk of `sd`, from whichever prefix
    holds it; empty when there is none."""
    keys = {_strip_wrappers(k): k for k in sd}
    for prefix in (STAGE1_PREFIX, *OLDER_PREFIXES):
        found = {
            STAGE1_PREFIX + k.removeprefix(prefix): original
            for k, original in keys.items()
            if k.startswith((prefix + BACKBONE, prefix + HEAD))
        }
        if any(k.startswith(STAGE1_PREFIX + BACKBONE) for k in found):
            return found
    return {}


def find_stage1_trunk(sd: Mapping[str, Any]) -> dict[str, Any]:
    """The stage-1 trunk's tensors of `sd` under `STAGE1_PREFIX` (`stage1_keys`); empty when there is none."""
    return {key: sd[original] for key, original in stage1_keys(sd).items()}


def detect_kind(trunk: Mapping[str, Any], source: str) -> str:
    """The stage-1 kind of a trunk (keys under `STAGE1_PREFIX`): the family its first module names,
    then the variant whose parameters fit best (all of them, for a complete trunk)."""
    relative = {
        k.removeprefix(STAGE1_PREFIX + BACKBONE) for k in trunk if k.startswith(STAGE1_PREFIX + BACKBONE)
    }
    family = next(
        (f for marker, f in FAMILY_MARKERS.items() if any(k.startswith(marker) for k in relative)), None
    )
    if family is None:
        examples = ", ".join(sorted(relative)[:3])
        raise CheckpointError(
            f"{source}: the trunk under {STAGE1_PREFIX}{BACKBONE} is none of RepViT, TinyViT, EfficientViT "
            f"(keys such as {examples})"
        )
    backbone = STAGE1_PREFIX + BACKBONE
    found = {k: tuple(np.shape(v)) for k, v in trunk.items() if k.startswith(backbone)}
    found = {k: s for k, s in found.items() if not k.endswith(".num_batches_tracked")}

    def misfit(kind: str) -> int:
        want = {k: s for k, s in _torch_shapes(kind, 1024).items() if k.startswith(backbone)}
        return sum(found.get(k) != shape for k, shape in want.items()) + sum(k not in want for k in found)

    candidates = [k for k in STAGE1_TRUNK_KINDS if k.startswith(family + "_")]
    return min(candidates, key=misfit)


def port_stage1_trunk(
    trunk: Mapping[str, Any], kind: str, *, out_dim: int = 1024, source: str = "<state dict>"
) -> dict:
    """A stage-1 trunk of kind `kind` (its keys under `STAGE1_PREFIX`: `find_stage1_trunk`) -> nested
    `Stage1Trunk` parameters, strictly: every missing, unexpected and mis-shaped trunk key is named
    in one `ParamMismatchError`."""
    table = stage1_table(kind, out_dim)
    expected = {f"trunk.{r.jax}": s for r, s in _rules(kind, out_dim)}
    what = f"the checkpoint's trunk does not match the stage-1 {kind} trunk es3 expects"
    return port_state_dict(trunk, table=table, expected=expected, source=source, what=what).params["trunk"]


def port_backbone(kind: str, sd: Mapping[str, Any], source: str = "<state dict>") -> dict:
    """A backbone's state dict keyed by upstream's module names (those under `backbone.model.`) ->
    nested parameters of the family module (`RepViT`, `TinyViT`, `EfficientViT`), strictly."""
    table = stage1_table(kind)
    prefixed = {STAGE1_PREFIX + BACKBONE + k: v for k, v in sd.items()}
    expected = {f"trunk.{r.jax}": s for r, s in _rules(kind, 1024) if r.jax.startswith("backbone.")}
    what = f"the state dict does not match the {kind} backbone"
    return port_state_dict(prefixed, table=table, expected=expected, source=source, what=what).params[
        "trunk"
    ]["backbone"]


def stage1_trunk_to_torch(kind: str, params: Mapping, out_dim: int = 1024) -> dict[str, np.ndarray]:
    """es3 `Stage1Trunk` parameters -> the merged checkpoint's keys (under `STAGE1_PREFIX`)."""
    table = stage1_table(kind, out_dim)
    out = {}
    for path, value in flatten(params).items():
        hit = table.to_torch(f"trunk.{path}")
        if hit is None:
            raise CheckpointError(f"no checkpoint key for {kind} trunk parameter {path}")
        key, transform = hit
        out[key] = transform.to_torch(np.asarray(value))
    return out


# timm's models of the same architectures (other module names), the PyTorch side of `es3 bench embed`.
TIMM_NAMES = {
    "repvit_m0_9": "repvit_m0_9",
    "repvit_m1_1": "repvit_m1_1",
    "repvit_m2_3": "repvit_m2_3",
    "tiny_vit_5m": "tiny_vit_5m_224",
    "tiny_vit_11m": "tiny_vit_11m_224",
    "tiny_vit_21m": "tiny_vit_21m_224",
    "efficientvit_b0": "efficientvit_b0",
    "efficientvit_b1": "efficientvit_b1",
    "efficientvit_b2": "efficientvit_b2",
}


class _TimmStage1Trunk(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, channels: int, grid: int, out_dim: int):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Sequential(
            torch.nn.Conv2d(channels, out_dim, 1, bias=False),
            torch.nn.BatchNorm2d(out_dim),
            torch.nn.GELU(),
            torch.nn.Conv2d(out_dim, out_dim, 3, padding=1),
        )
        self.grid = grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, S, S]` -> `[B, out_dim, grid, grid]`."""
        x = self.head(self.backbone.forward_features(images))
        return torch.nn.functional.interpolate(
            x, size=(self.grid, self.grid), mode="bilinear", align_corners=False
        )


def timm_stage1_trunk(kind: str, grid: int, out_dim: int = 1024) -> torch.nn.Module:
    """timm's model of a stage-1 backbone with the stage-1 head, random weights, eval mode."""
    try:
        import timm
    except ImportError as e:
        raise CheckpointError(f"the PyTorch {kind} trunk is timm's model: pip install timm") from e
    backbone = timm.create_model(TIMM_NAMES[kind], pretrained=False, num_classes=0)
    return _TimmStage1Trunk(backbone, backbone.num_features, grid, out_dim).eval()
