"""timm's EfficientViT (MIT) as the reference for the stage-1 EfficientViT trunk, with random weights.

timm's `efficientvit_b*` have upstream's widths, depths and maths under other module names;
`timm_to_upstream` renames its state dict into upstream's (efficientsam3 `EfficientViTBackbone`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from porting.stage1_checkpoint import TIMM_NAMES  # noqa: E402

UPSTREAM_ATTN_EPS = 1e-15  # upstream LiteMLA's eps; timm's default is 1e-5


def build_timm(kind: str, *, device: str = "cpu") -> torch.nn.Module:
    """timm's model for `kind` (default init, no classifier), eval mode, upstream's attention eps."""
    model = timm.create_model(TIMM_NAMES[kind], pretrained=False, num_classes=0, device=device)
    for m in model.modules():
        if type(m).__name__ == "LiteMLA":
            m.eps = UPSTREAM_ATTN_EPS
    return model.eval()


def random_timm(kind: str, seed: int) -> torch.nn.Module:
    """timm's `kind` with every parameter and BatchNorm statistic drawn from `seed`.

    Convs keep torch's default init scale (kaiming-uniform, a = √5); BatchNorm weight ~ U(0.5, 1.5),
    bias and running mean ~ N(0, 0.1²), running var ~ U(0.5, 2); conv biases ~ N(0, 0.05²). timm's
    zero-initialised last-BN gammas are redrawn like every other, so no residual branch is dead.
    """
    torch.manual_seed(seed)
    model = build_timm(kind)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, torch.nn.Conv2d):
                bound = 1.0 / (m.weight[0].numel() ** 0.5)  # kaiming_uniform(a=√5) bound
                m.weight.copy_((2 * torch.rand(m.weight.shape, generator=g) - 1) * bound)
                if m.bias is not None:
                    m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
    return model


_RENAMES = (
    (re.compile(r"^stem\.in_conv\."), lambda m: "input_stem.op_list.0."),
    (re.compile(r"^stem\.res(\d+)\."), lambda m: f"input_stem.op_list.{int(m[1]) + 1}."),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\."), lambda m: f"stages.{m[1]}.op_list.{m[2]}."),
)


def timm_to_upstream(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's EfficientViT state dict -> upstream `EfficientViTBackbone` keys (the classifier head dropped).

    `stem.in_conv` -> `input_stem.op_list.0`, `stem.res{k}` -> `input_stem.op_list.{k+1}`,
    `stages.i.blocks.j` -> `stages.i.op_list.j`; everything below a block has the same names.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("head."):
            continue
        for pattern, repl in _RENAMES:
            new, n = pattern.subn(repl, key)
            if n:
                out[new] = value
                break
        else:
            raise KeyError(f"timm EfficientViT key {key!r} has no upstream name")
    return out


def timm_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images `[B, 3, S, S]` -> the last stage's map `[B, C, h, w]` (upstream's `stage_final`)."""
    with torch.no_grad():
        return model.forward_features(images)
