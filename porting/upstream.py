"""The upstream PyTorch models (the `sam3` package) with random weights, runnable on any machine.

Parity tests and the PyTorch columns of `es3 bench` build their references here. Importing this
module needs torch and sam3 (the `torch` extra); it patches the few places where upstream code
hard-codes CUDA, and only when no GPU is present.
"""

from __future__ import annotations

import math

import torch


def _install_cpu_shims() -> None:
    """Let the upstream code run without CUDA (it hard-codes `.cuda()`, `pin_memory()` and a CUDA cache)."""
    if torch.cuda.is_available():
        return
    import sam3.model.position_encoding as pe

    if getattr(pe.PositionEmbeddingSine.__init__, "_es3_cpu", False):
        return
    original = pe.PositionEmbeddingSine.__init__

    def cpu_init(
        self, num_pos_feats, temperature=10000, normalize=True, scale=None, precompute_resolution=None
    ):
        original(
            self,
            num_pos_feats,
            temperature=temperature,
            normalize=normalize,
            scale=scale,
            precompute_resolution=None,
        )

    cpu_init._es3_cpu = True
    pe.PositionEmbeddingSine.__init__ = cpu_init
    torch.Tensor.cuda = lambda t, *a, **k: t
    torch.Tensor.pin_memory = lambda t, *a, **k: t


_install_cpu_shims()


def _is_embedding(name: str) -> bool:
    """Learned tokens and embedding tables (drawn at unit scale), as opposed to weight matrices."""
    parts = [p for p in name.removesuffix(".weight").split(".") if not p.isdigit()]
    return any(s in parts[-1] for s in ("token", "embed", "tpos_enc", "no_obj_ptr", "gaussian"))


def randomize_(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Overwrite every float parameter and buffer with fresh random values; return the state dict.

    Upstream initialisation leaves many tensors at 0 or 1 (biases, layer scales of 1e-6,
    norms), which would make parity checks blind to those parameters. Weight matrices get
    `N(0, 1/fan_in)`, learned tokens and embeddings `N(0, 1)`, norm scales `1 + N(0, 0.1)`,
    layer scales `0.5 + N(0, 0.1)`, biases `N(0, 0.1)`.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if _is_embedding(name):
                t.copy_(torch.randn(t.shape, generator=g))
            elif t.ndim >= 2:
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(max(math.prod(t.shape[1:]), 1)))
            elif "norm" in name and name.endswith("weight"):
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith("gamma"):
                t.copy_(0.5 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return module.state_dict()


def build_tracker(seed: int, *, memory_selection: bool = False) -> torch.nn.Module:
    """The upstream SAM3 tracker (no backbone) in eval mode with fresh random weights."""
    from sam3.model_builder import build_tracker as upstream_build

    tracker = upstream_build(apply_temporal_disambiguation=memory_selection, with_backbone=False)
    tracker.eval()
    randomize_(tracker, seed)
    return tracker


def build_neck(seed: int) -> torch.nn.Module:
    """The upstream tracker neck (`sam2_convs`, all 4 levels) with fresh random weights."""
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine

    class _Trunk(torch.nn.Module):
        channel_list = (1024,)

    neck = Sam3DualViTDetNeck(_Trunk(), PositionEmbeddingSine(256), d_model=256, add_sam2_neck=True)
    neck.eval()
    randomize_(neck, seed)
    return neck
