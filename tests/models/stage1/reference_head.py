"""Upstream's stage-1 head in PyTorch, every weight and BatchNorm statistic random."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def random_head(channels: int, out_dim: int, seed: int) -> torch.nn.Sequential:
    """`Conv2d(C, D, 1, bias=False)`, `BatchNorm2d(D)`, `GELU()`, `Conv2d(D, D, 3, padding=1)`, eval mode;
    BatchNorm scales and variances U(0.5, 1.5), everything else N(0, 0.2²)."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Sequential(
        torch.nn.Conv2d(channels, out_dim, 1, bias=False),
        torch.nn.BatchNorm2d(out_dim),
        torch.nn.GELU(),
        torch.nn.Conv2d(out_dim, out_dim, 3, padding=1),
    ).eval()
    with torch.no_grad():
        for name, t in head.state_dict().items():
            if name.endswith(("running_var", "1.weight")):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            elif not name.endswith("num_batches_tracked"):
                t.copy_(0.2 * torch.randn(t.shape, generator=gen))
    return head
