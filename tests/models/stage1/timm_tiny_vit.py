"""timm's TinyViT as the stand-in for EfficientSAM3's TinyViT backbone in parity tests.

timm's `tiny_vit_*_224` has upstream's maths (verified against `sam3/sam3/backbones/tiny_vit.py`
at 1008 px) under other names: `ConvNorm.conv` for upstream's `Conv2d_BN.c`,
`patch_embed.conv{1,2}` for `patch_embed.seq.{0,2}`, and each stage's `downsample` at the start
of `stages.{i}` where upstream ends `layers.{i-1}` with it. timm sizes its grids from the input
(upstream fixes them from `img_size`), which agrees wherever upstream runs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from porting.stage1_checkpoint import TIMM_NAMES


def build_timm(kind: str, device: str | None = None) -> torch.nn.Module:
    """timm's model for `kind` with its classifier removed (`num_classes=0`), timm's own init."""
    from timm.models import tiny_vit

    # timm's own builder, not the registry: importing upstream's tiny_vit.py re-registers the names.
    with torch.device(device or "cpu"):
        return getattr(tiny_vit, TIMM_NAMES[kind])(pretrained=False, num_classes=0)


def random_timm(kind: str, seed: int) -> torch.nn.Module:
    """timm's model in eval mode, float32, with every parameter and BatchNorm statistic drawn afresh.

    timm starts the MBConv residual BN gammas and the attention biases at zero; here nothing is 0
    or 1. Convs and Linears get torch's default init scale U(±1/√fan_in); BN and LayerNorm gammas
    U(0.5, 1.5), betas U(±0.3) (LayerNorm betas matter: each zero token padded into a window enters
    the attention as one); BN running means U(±0.2), variances U(0.5, 2); Linear biases U(±0.2);
    attention biases U(±1), on the scale of the logits. The 1008 px output stays O(1) (|x| < ~30).
    """
    model = build_timm(kind)
    g = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=g))

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                uniform(module.weight, -bound, bound)
                if module.bias is not None:
                    uniform(module.bias, -0.2, 0.2)
            elif isinstance(module, torch.nn.BatchNorm2d):
                uniform(module.weight, 0.5, 1.5)
                uniform(module.bias, -0.3, 0.3)
                uniform(module.running_mean, -0.2, 0.2)
                uniform(module.running_var, 0.5, 2.0)
            elif isinstance(module, torch.nn.LayerNorm):
                uniform(module.weight, 0.5, 1.5)
                uniform(module.bias, -0.3, 0.3)
            elif hasattr(module, "attention_biases"):
                uniform(module.attention_biases, -1.0, 1.0)
    # eval() also clears timm's cached [heads, N, N] bias tables (they would hold the zeros).
    return model.float().eval()


_PATCH_EMBED = re.compile(r"^patch_embed\.conv([12])\.")
_DOWNSAMPLE = re.compile(r"^stages\.(\d+)\.downsample\.")


def _upstream_name(key: str) -> str | None:
    """timm key -> upstream key, None for keys upstream's backbone model lacks."""
    if key.startswith("head."):  # timm's NormMlpClassifierHead; upstream's adapter drops norm_head
        return None
    key = re.sub(r"\.conv\.weight$", ".c.weight", key)
    if m := _PATCH_EMBED.match(key):
        return f"patch_embed.seq.{2 * (int(m[1]) - 1)}." + key[m.end() :]
    if m := _DOWNSAMPLE.match(key):
        return f"layers.{int(m[1]) - 1}.downsample." + key[m.end() :]
    return re.sub(r"^stages\.", "layers.", key)


def timm_to_upstream(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's state dict under upstream's backbone-model names (`TinyViT.state_dict()` with the
    adapter's `head` / `norm_head` removed), dropping timm's classifier head."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = _upstream_name(key)
        if name is not None:
            out[name] = value
    return out


def timm_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images `[B, 3, S, S]` -> the last layer's map `[B, C, h, w]`, what upstream's adapter returns."""
    return model.forward_features(images)
