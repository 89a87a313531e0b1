"""PyTorch checkpoint files as es3 reads and writes them, and the record a merged export carries.

Read: a `.pt`/`.pth` (flat, or `{"model": state dict, ...}`: the other top-level entries come back
as extras), a `.safetensors` (its metadata strings are the extras), or a folder of `.safetensors`
files (the transformers layout). Each file is opened once; large `.pt` files are memory-mapped and
`torch.load(weights_only=True)` runs no code from a checkpoint. Tensors keep their stored dtype.

Write: `{"model": state dict, "es3_config": record}` (`.pt`) or a `.safetensors` with the record in
its metadata, through a temporary file in the same folder that is synced and renamed into place,
so the file is either complete or absent (`es3_jax.outputs`).

The record (`es3_config`) says what a merged export holds: the model sections of the config
(MODEL.TEACHER / TRUNK / PERCEIVER / MEMORY_ATTENTION), whether its memory path is the student's,
and where the parts came from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from es3_jax import config as config_lib
from es3_jax.errors import Es3Error
from es3_jax.outputs import staged_file

RECORD_KEY = "es3_config"
RECORD_FORMAT = "es3-efficient-sam3"
RECORD_VERSION = 1
RECORDED_SECTIONS = ("TEACHER", "TRUNK", "PERCEIVER", "MEMORY_ATTENTION")
FORMATS = ("pt", "safetensors")


class CheckpointError(Es3Error):
    """A checkpoint that cannot be read or written, or does not fit es3; the message names the file."""


def as_numpy(value: Any) -> np.ndarray:
    """A tensor (bf16 and fp16 widened to float32) or array as a numpy array."""
    if isinstance(value, torch.Tensor):
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.float()
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
    return sd, meta


def _read_pt(path: Path) -> tuple[dict, dict]:
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


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict]:
    """(the state dict as stored, the file's other entries) of a checkpoint file or folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: folder holds no .safetensors file")
        sd: dict[str, Any] = {}
        meta: dict = {}
        for file in files:
            part, part_meta = _read_safetensors(file)
            sd.update(part)
            meta.update(part_meta)
        return sd, meta
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_pt(path)


def record_of(extras: Mapping) -> dict | None:
    """The es3 record among a file's extras (a dict in a `.pt`, a JSON string in safetensors metadata)."""
    record = extras.get(RECORD_KEY)
    if isinstance(record, str):
        try:
            record = json.loads(record)
        except ValueError as e:
            raise CheckpointError(f"{RECORD_KEY} metadata is not valid JSON: {e}") from e
    if record is not None and not isinstance(record, Mapping):
        raise CheckpointError(f"{RECORD_KEY} is a {type(record).__name__}, not a record")
    return None if record is None else dict(record)


def config_record(cfg: config_lib.Config, memory: str, source: Mapping[str, Any]) -> dict:
    """The record of a merged export of `cfg`'s model; memory: "student" or "teacher"."""
    model = config_lib.to_dict(cfg.MODEL)
    return {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "memory": memory,
        "MODEL": {k: model[k] for k in RECORDED_SECTIONS},
        "source": dict(source),
    }


def record_config(record: Mapping, base: config_lib.Config | None = None) -> config_lib.Config:
    """The config a record describes (its MODEL sections over `base` or the defaults)."""
    if record.get("format") != RECORD_FORMAT:
        raise CheckpointError(f"not an es3 export record (format {record.get('format')!r})")
    model = {k: v for k, v in record.get("MODEL", {}).items() if k in RECORDED_SECTIONS}
    return config_lib.validate(config_lib.merge(base or config_lib.Config(), {"MODEL": model}))


def write_checkpoint(path: str | Path, sd: Mapping, record: Mapping, fmt: str) -> Path:
    """Write `{"model": sd, "es3_config": record}` (pt) or a safetensors file with the record in its
    metadata, atomically (`es3_jax.outputs.staged_file`: an OutputError names a failed write)."""
    if fmt not in FORMATS:
        raise CheckpointError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    path = Path(path).absolute()
    if fmt == "safetensors":
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(
                f"safetensors holds tensors only; the state dict has non-tensor entries: {bad[:5]}"
            )
    with staged_file(path) as f:
        if fmt == "safetensors":
            # Views of one storage (e.g. from `mmap`) must be separate tensors in safetensors.
            f.write(
                save_safetensors(
                    {k: v.contiguous().clone() for k, v in sd.items()},
                    metadata={RECORD_KEY: json.dumps(record)},
                )
            )
        else:
            _torch_save({"model": dict(sd), RECORD_KEY: dict(record)}, f)
    return path


class _KeepsWriteError:
    """A file as `torch.save` writes it, keeping the OSError of a failed write: torch's zip writer
    reports one only as a RuntimeError without its cause."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(obj: Any, f: BinaryIO) -> None:
    writer = _KeepsWriteError(f)
    try:
        torch.save(obj, writer)
    except RuntimeError:
        if writer.error is None:
            raise
        raise writer.error from None
