"""The upstream PyTorch references (the `sam3` package) for parity tests, on any machine.

Importing this module skips the calling test module when torch or sam3 is missing.
Weights are drawn fresh on every run; the seed is printed so a failure can be replayed with
`ES3_TEST_SEED=<seed>`.
"""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam3")


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


def fresh_seed() -> int:
    seed = int(os.environ.get("ES3_TEST_SEED", secrets.randbits(31)))
    print(f"[es3 test seed {seed}]")
    return seed


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


def sam3_checkpoint_dict(tracker: torch.nn.Module, neck: torch.nn.Module | None = None) -> dict:
    """A state dict in the `sam3.pt` layout (`tracker.*`, `detector.backbone.vision_backbone.*`)."""
    model = {f"tracker.{k}": v.detach().clone() for k, v in tracker.state_dict().items()}
    if neck is not None:
        for k, v in neck.sam2_convs.state_dict().items():
            model[f"detector.backbone.vision_backbone.sam2_convs.{k}"] = v.detach().clone()
        for k, v in neck.convs.state_dict().items():
            model[f"detector.backbone.vision_backbone.convs.{k}"] = v.detach().clone()
    return model


def save_sam3_checkpoint(path: Path, model: dict) -> Path:
    torch.save({"model": model}, path)
    return path


def ported_reference(folder: Path, *, tracker_fn=None):
    """Fresh upstream tracker and neck, written as `folder/sam3.pt` and read back through the
    production loader -> (seed, tracker, neck, ported params).

    `tracker_fn(tracker)` may adjust the upstream tracker's weights before they are saved.
    """
    from porting.sam3_checkpoint import port_checkpoint

    seed = fresh_seed()
    tracker, neck = build_tracker(seed), build_neck(seed)
    if tracker_fn is not None:
        tracker_fn(tracker)
    path = save_sam3_checkpoint(Path(folder) / "sam3.pt", sam3_checkpoint_dict(tracker, neck))
    return seed, tracker, neck, port_checkpoint(path).params


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def nchw_to_nhwc(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(to_numpy(t).transpose(0, 2, 3, 1))


def relative_error(ours, ref) -> float:
    """max|ours - ref| / max|ref|, the parity figure the test suite reports."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != upstream {ref.shape}"
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


# Every figure measured in this session, printed at the end of the run by tests/conftest.py.
PARITY_FIGURES: list[tuple[str, float, float]] = []


def report(name: str, ours, ref, tol: float) -> float:
    """Record, print and check one parity figure."""
    err = relative_error(ours, ref)
    PARITY_FIGURES.append((name, err, tol))
    print(f"[parity] {name}: relative error {err:.3e} (tolerance {tol:.0e})")
    assert err <= tol, f"{name}: relative error {err:.3e} exceeds {tol:.0e}"
    return err
