"""timm's RepViT as the stand-in for EfficientSAM3's RepViT backbone in tests.

timm's `RepVit` computes what upstream's `sam3/backbones/repvit.py` computes (same widths, blocks,
squeeze-excite placement, GELU, training-form `RepVggDw` with `legacy=False`), but groups the
modules differently:

* upstream `features.0.{0,2}` is timm's `stem.conv{1,2}`;
* upstream's flat `features.N` list holds, in order: timm's `stages.0.blocks.*`, then for each
  later stage the downsample's `pre_block` (a stride-1 block without squeeze-excite), the
  stride-2 block (`spatial_downsample` -> `token_mixer.0`, `channel_downsample` ->
  `token_mixer.2`, `ffn` -> `channel_mixer.m`), and the stage's `blocks.*`;
* inside a stride-1 block `token_mixer.*` is `token_mixer.0.*`, `se.*` is `token_mixer.1.*` and
  `channel_mixer.conv{1,2}` is `channel_mixer.m.{0,2}`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from porting.stage1_checkpoint import TIMM_NAMES  # noqa: E402

# The image the BatchNorm statistics are measured on when the caller gives none.
_CALIBRATION_SHAPE = (1, 3, 256, 256)


def build_timm(kind: str, *, device: str = "cpu") -> torch.nn.Module:
    """The timm model for `kind`, headless, timm's own (partly constant) initialisation."""
    return timm.create_model(TIMM_NAMES[kind], pretrained=False, num_classes=0, device=device)


@torch.no_grad()
def random_timm(kind: str, seed: int, calibration: torch.Tensor | None = None) -> torch.nn.Module:
    """timm's model in eval mode, float32, every parameter and BatchNorm statistic random.

    Conv weights are N(0, 1/fan_in), biases N(0, 0.1²), BatchNorm affines U(0.5, 1.5) and
    N(0, 0.2²), except the last gamma of each residual MLP (timm's 0): U(0.05, 0.2).

    Random running statistics let the activations grow geometrically with depth (every block
    re-normalises its stream, so any systematic mismatch compounds), so each BatchNorm's
    statistics are those of its own input on `calibration` (`[B, 3, S, S]`; by default one
    N(0, 1) image of 256 px), perturbed (mean + N(0, (0.2·std)²), var · U(0.7, 1.4)): set during
    one eval-mode pass, in order, so that every layer is measured downstream of the perturbed
    layers before it. Activations on the calibration images stay O(1) at any depth; on other
    images they drift with depth (M2.3's 57 blocks most), the more the more the images differ
    (in size: the share of border pixels). With the default, M1.1 and M2.3 at 1008 px end with
    max |x| ~ 10-20.
    """
    gen = torch.Generator().manual_seed(seed)
    model = build_timm(kind).float().eval()

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    def calibrate(bn: torch.nn.BatchNorm2d, args: tuple) -> None:
        x = args[0].double()
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
        bn.running_mean.copy_(mean + normal(mean.shape, 0.2) * var.sqrt())
        bn.running_var.copy_(var * uniform(var.shape, 0.7, 1.4))

    hooks = []
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.copy_(normal(module.weight.shape, fan_in**-0.5))
            if module.bias is not None:
                module.bias.copy_(normal(module.bias.shape, 0.1))
        elif isinstance(module, torch.nn.BatchNorm2d):
            # timm zero-initialises the last gamma of each residual MLP: keep those small but not
            # zero. The MLP's GELU amplifies perturbations once the next BatchNorm re-normalises
            # (GELU's slope has more energy than its centred output), so with gammas near 1 the
            # network is chaotic: float32 round-off grows ~10% a block, to 1e-4..7e-4 (timm
            # against itself in float64) at M2.3's end; ~2.5e-5 with U(0.1, 0.4), ~7e-6 with
            # these. The branches still count: the tanh GELU in place of the exact one moves
            # M2.3's output by 3e-3, M1.1's by 5e-4.
            small = bool(module.weight.eq(0).all())
            module.weight.copy_(uniform(module.weight.shape, *((0.05, 0.2) if small else (0.5, 1.5))))
            module.bias.copy_(normal(module.bias.shape, 0.2))
            hooks.append(module.register_forward_pre_hook(calibrate))
        elif any(True for _ in module.parameters(recurse=False)):
            raise TypeError(f"random_timm does not know how to draw {type(module).__name__}")
    model.forward_features(normal(_CALIBRATION_SHAPE, 1.0) if calibration is None else calibration.float())
    for hook in hooks:
        hook.remove()
    return model


_STRIDE1_RENAMES = (
    ("token_mixer.", "token_mixer.0."),
    ("se.", "token_mixer.1."),
    ("channel_mixer.conv1.", "channel_mixer.m.0."),
    ("channel_mixer.conv2.", "channel_mixer.m.2."),
)
_STRIDE2_RENAMES = (
    ("spatial_downsample.", "token_mixer.0."),
    ("channel_downsample.", "token_mixer.2."),
    ("ffn.conv1.", "channel_mixer.m.0."),
    ("ffn.conv2.", "channel_mixer.m.2."),
)


def _rename(rest: str, renames) -> str:
    for old, new in renames:
        if rest.startswith(old):
            return new + rest[len(old) :]
    raise KeyError(f"no upstream name for block key {rest!r}")


def timm_to_upstream(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's state dict in upstream's backbone names (`features.N.*`), the classifier dropped."""
    depths: dict[int, int] = {}
    for key in sd:
        if m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", key):
            stage, block = int(m[1]), int(m[2])
            depths[stage] = max(depths.get(stage, 0), block + 1)
    # upstream index of: (stage, "pre_block"), (stage, "down"), (stage, block j)
    index: dict[tuple[int, object], int] = {}
    f = 1
    for stage in range(len(depths)):
        if stage > 0:
            index[stage, "pre_block"], index[stage, "down"] = f, f + 1
            f += 2
        for j in range(depths[stage]):
            index[stage, j] = f + j
        f += depths[stage]

    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("head."):
            continue
        if key.startswith("stem.conv1."):
            new = "features.0.0." + key[len("stem.conv1.") :]
        elif key.startswith("stem.conv2."):
            new = "features.0.2." + key[len("stem.conv2.") :]
        elif m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", key):
            new = f"features.{index[int(m[1]), int(m[2])]}." + _rename(m[3], _STRIDE1_RENAMES)
        elif m := re.match(r"stages\.(\d+)\.downsample\.pre_block\.(.*)", key):
            new = f"features.{index[int(m[1]), 'pre_block']}." + _rename(m[2], _STRIDE1_RENAMES)
        elif m := re.match(r"stages\.(\d+)\.downsample\.(.*)", key):
            new = f"features.{index[int(m[1]), 'down']}." + _rename(m[2], _STRIDE2_RENAMES)
        else:
            raise KeyError(f"no upstream name for timm key {key!r}")
        out[new] = value
    return out


@torch.no_grad()
def timm_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images `[B, 3, S, S]` -> the stride-32 map `[B, C, ceil(S/32), ceil(S/32)]` (upstream's
    `RepViTAdapter` output: `features` run in order, no pooling)."""
    return model.forward_features(images)
