"""The embedding store: pre-computed trunk features, one TensorStore zarr v3 array per video.

Layout:
```
<root>/global_metadata.json        dataset-level record, written by process 0 at the end of a run
<root>/<video>/features.zarr/      [T, h, w, C] bfloat16 (or float32, or int8); one frame per
                                   chunk, shards of 16 frames, blosc-zstd with byte shuffle
<root>/<video>/scales.zarr/        [T, C] float32, int8 stores only: each frame's per-channel scale
<root>/<video>/metadata.json       frame names, shape, dtype, trunk, normalisation; written last
```
A video is complete exactly when its `metadata.json` exists: the array is written (and synced)
first and the metadata is renamed into place last, so an interrupted writer never leaves a video
that reads as complete. One writer per video; writes cover whole shards. A write that fails (a full
disk, say) is a StoreWriteError naming the video, the store and the system's reason.

An int8 store holds round(x / s) with s = max|x| / 127 over each frame's channel (half the bytes
of bf16); `read` gives back q · s in bfloat16.

Readers open nothing until the first `read`, keep one TensorStore handle per video and process
(TensorStore is not fork-safe: a store object is picklable and re-opens lazily in each worker),
and refuse a store whose trunk or normalisation differs from what they expect.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts

from es3_jax.errors import Es3Error
from es3_jax.outputs import system_error

FORMAT = "es3-embeddings"
VERSION = 1
ARRAY = "features.zarr"
METADATA = "metadata.json"
GLOBAL_METADATA = "global_metadata.json"
LAYOUT = "THWC"
DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "int8": np.dtype(np.int8),
}
SCALES = "scales.zarr"
INT8_MAX = 127


def read_dtype(dtype: str) -> np.dtype:
    """What `EmbeddingStore.read` returns for a store of `dtype`: int8 stores come back as bfloat16."""
    return DTYPES["bfloat16"] if dtype == "int8" else DTYPES[dtype]


def quantize(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`[n, h, w, C]` float -> (int8 values `[n, h, w, C]`, float32 scales `[n, C]`): per frame and
    channel, s = max|x| / 127 (1 where the channel is all zeros) and q = round(x / s)."""
    x = np.asarray(features, np.float32)
    scales = np.abs(x).max(axis=(1, 2)) / INT8_MAX
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scales[:, None, None, :]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scales


def dequantize(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of `quantize`, in float32."""
    return q.astype(np.float32) * scales[:, None, None, :]


# What makes two sets of features interchangeable; a store mixing values of these is refused.
IDENTITY_KEYS = ("trunk", "pixel_mean", "pixel_std", "image_size")


class StoreError(Es3Error):
    """An embedding store that is missing, incomplete or does not match; names the path and values."""


class StoreWriteError(StoreError):
    """A store that cannot be written (a full or read-only disk): names the video or file, the store
    and the system's reason. Not a problem of one video: every later write would fail too."""


def identity(
    trunk: str,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    image_size: int,
    trunk_kind: str = "sam3_vit",
) -> dict[str, Any]:
    """The identity record of a set of features (the keys of `expect`): the trunk's fingerprint and
    kind (`MODEL.TRUNK.KIND`), the pixel normalisation and the input size."""
    return {
        "trunk": str(trunk),
        "trunk_kind": str(trunk_kind),
        "pixel_mean": [float(x) for x in pixel_mean],
        "pixel_std": [float(x) for x in pixel_std],
        "image_size": int(image_size),
    }


# Stores written before a record had the key held features of the only trunk there was.
_IDENTITY_DEFAULTS = {"trunk_kind": "sam3_vit"}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-7 * max(1.0, abs(float(b)))
    return a == b


def check_identity(found: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    """StoreError naming both values for every key of `expected` that `found` contradicts."""
    found = {**_IDENTITY_DEFAULTS, **found}
    bad = [k for k in expected if not _same(found.get(k), expected[k])]
    if bad:
        lines = [f"  {k}: the store has {found.get(k)!r}, expected {expected[k]!r}" for k in bad]
        raise StoreError(f"embedding store {where} was written with different settings:\n" + "\n".join(lines))


# What a failed video write means for the store, after the reason.
_VIDEO_NOT_WRITTEN = (
    "; the videos already complete are kept and this one is not marked complete: "
    "run `es3 embed` again once the store can be written to finish it"
)


@contextlib.contextmanager
def _writing(what: str, after: str = "") -> Iterator[None]:
    """A failed write inside (an OSError, or TensorStore's error) -> StoreWriteError naming `what`
    and the system's reason, then `after`."""
    try:
        yield
    except (OSError, ValueError) as e:
        failure = system_error(e)
        if failure is None:
            raise
        raise StoreWriteError(f"cannot write {what}: {failure.strerror}{after}") from e


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON so that readers see the old file, or none, or the whole new one; durable on return."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {path}: {e}") from e


def _array_spec(path: Path, shape: Sequence[int], dtype: str, shard_frames: int, clevel: int) -> dict:
    """A zarr v3 array of frames `[T, ...]`: one frame per chunk, `shard_frames` frames per file."""
    frame = [1, *shape[1:]]
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_frames, *shape[1:]]}},
            "chunk_key_encoding": {"name": "default"},
            "fill_value": 0,
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": frame,
                        "codecs": [
                            {"name": "bytes", "configuration": {"endian": "little"}},
                            {
                                "name": "blosc",
                                "configuration": {
                                    "cname": "zstd",
                                    "clevel": clevel,
                                    "shuffle": "shuffle",
                                    "typesize": DTYPES[dtype].itemsize,
                                    "blocksize": 0,
                                },
                            },
                        ],
                        "index_codecs": [
                            {"name": "bytes", "configuration": {"endian": "little"}},
                            {"name": "crc32c"},
                        ],
                        "index_location": "end",
                    },
                }
            ],
            "dimension_names": ["frame", "h", "w", "c"] if len(shape) == 4 else ["frame", "c"],
        },
    }


def _context(read_threads: int = 8):
    # No chunk cache: frames are read once per clip, and cached handles grow RSS (tensorstore#223).
    return ts.Context(
        {
            "cache_pool": {"total_bytes_limit": 0},
            "data_copy_concurrency": {"limit": read_threads},
            "file_io_concurrency": {"limit": read_threads},
        }
    )


class EmbeddingStore:
    """Random access to stored trunk features, and the writer side used by `es3 embed`.

    `expect` (keys of `identity()`: trunk, pixel_mean, pixel_std, image_size; any subset) is
    checked against the global and per-video metadata; a mismatch raises StoreError naming both.
    Construction opens nothing; the object pickles to its root and `expect`.
    """

    def __init__(self, root: str | Path, *, expect: dict | None = None):
        self.root = Path(root)
        self.expect = dict(expect) if expect else None
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._context = None
        self._arrays: dict[str, Any] = {}
        self._meta: dict[str, dict] = {}
        self._index: dict[str, dict[str, int]] = {}
        self._videos: list[str] | None = None
        self._global_checked = False

    def __getstate__(self) -> dict:
        return {"root": self.root, "expect": self.expect}

    def __setstate__(self, state: dict) -> None:
        self.root, self.expect = state["root"], state["expect"]
        self._reset()

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.root)!r})"

    def _check_process(self) -> None:
        if os.getpid() != self._pid:  # forked: handles of the parent must not be used here
            self._reset()

    # ---- reading ------------------------------------------------------------------------------

    def global_metadata(self) -> dict | None:
        """The dataset-level record, or None before a run has finished."""
        try:
            return _read_json(self.root / GLOBAL_METADATA)
        except FileNotFoundError:
            return None

    def _check_global(self) -> None:
        if self._global_checked or not self.expect:
            return
        meta = self.global_metadata()
        if meta is not None:
            check_identity(meta, self.expect, str(self.root / GLOBAL_METADATA))
        self._global_checked = True

    def videos(self) -> list[str]:
        """Names of the complete videos (their metadata.json exists), sorted."""
        self._check_process()
        if self._videos is None:
            if not self.root.is_dir():
                raise StoreError(f"embedding store not found: {self.root}")
            self._check_global()
            self._videos = sorted(
                p.name for p in self.root.iterdir() if p.is_dir() and (p / METADATA).is_file()
            )
        return list(self._videos)

    def is_complete(self, video: str) -> bool:
        return (self.root / video / METADATA).is_file()

    def metadata(self, video: str) -> dict:
        """Per-video metadata: frame_names, num_frames, shape [T, h, w, C], dtype, trunk, pixel_mean/std,
        image_size, ... StoreError when the video is absent or incomplete, or does not match `expect`."""
        self._check_process()
        meta = self._meta.get(video)
        if meta is None:
            path = self.root / video / METADATA
            try:
                meta = _read_json(path)
            except FileNotFoundError:
                state = "incomplete" if (self.root / video).is_dir() else "not in the store"
                raise StoreError(f"video {video!r} is {state}: no {path}") from None
            if meta.get("format") != FORMAT:
                raise StoreError(f"{path}: not an es3 embedding store (format {meta.get('format')!r})")
            self._check_global()
            if self.expect:
                check_identity(meta, self.expect, str(path))
            self._meta[video] = meta
        return meta

    def frame_index(self, video: str, stem: str) -> int:
        """Position of the frame named `stem` (e.g. "00004") in the video's stored array."""
        index = self._index.get(video)
        if index is None:
            index = {name: i for i, name in enumerate(self.metadata(video)["frame_names"])}
            self._index[video] = index
        try:
            return index[stem]
        except KeyError:
            raise StoreError(f"video {video!r} has no frame {stem!r} in {self.root}") from None

    def _array(self, video: str, name: str | None = None):
        """The video's features array (or its `name` array, e.g. the int8 scales), opened once."""
        self._check_process()
        meta = self.metadata(video)
        name = name or meta.get("array", ARRAY)
        key = f"{video}/{name}"
        arr = self._arrays.get(key)
        if arr is not None:
            return arr
        with self._lock:
            arr = self._arrays.get(key)
            if arr is None:
                if self._context is None:
                    self._context = _context()
                path = self.root / video / name
                try:
                    arr = ts.open(
                        {
                            "driver": "zarr3",
                            "kvstore": {"driver": "file", "path": str(path)},
                            "recheck_cached_data": False,
                            "recheck_cached_metadata": False,
                        },
                        read=True,
                        context=self._context,
                    ).result()
                except ValueError as e:
                    raise StoreError(f"cannot open {path}: {e}") from e
                want = meta["shape"] if name != SCALES else [meta["shape"][0], meta["shape"][-1]]
                if list(arr.shape) != list(want):
                    raise StoreError(f"{path}: array shape {list(arr.shape)} != metadata {want}")
                self._arrays[key] = arr
        return arr

    def read(self, video: str, frames: Sequence[int], *, dtype=None) -> np.ndarray:
        """Features of `frames` (indices into the video's frame list, any order, repeats allowed):
        `[len(frames), h, w, C]` in `read_dtype` of the store's dtype (ml_dtypes.bfloat16 by
        default; an int8 store's dequantized values in bfloat16) or `dtype`.
        Safe to call from several threads at once."""
        arr = self._array(video)
        idx = np.asarray(frames, dtype=np.int64).reshape(-1)
        n = arr.shape[0]
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise StoreError(f"video {video!r} has {n} frames; asked for frames {idx.tolist()}")
        stored = self.metadata(video)["dtype"]
        if idx.size == 0:
            out = np.zeros((0, *arr.shape[1:]), read_dtype(stored))
        else:
            try:
                out = arr[idx].read().result()
                if stored == "int8":
                    scales = self._array(video, SCALES)[idx].read().result()
                    out = dequantize(out, scales).astype(read_dtype(stored))
            except ValueError as e:
                raise StoreError(
                    f"reading video {video!r} frames {idx.tolist()} from {self.root}: {e}"
                ) from e
        return out if dtype is None else out.astype(dtype)

    # ---- writing ------------------------------------------------------------------------------

    def existing_identity(self) -> tuple[dict, str] | None:
        """The identity the store was written with (global metadata, else a complete video), or None."""
        meta = self.global_metadata()
        if meta is not None:
            return meta, str(self.root / GLOBAL_METADATA)
        if self.root.is_dir():
            for p in sorted(self.root.iterdir()):
                if (p / METADATA).is_file():
                    return _read_json(p / METADATA), str(p / METADATA)
        return None

    def check_writable(self, ident: Mapping[str, Any], dtype: str) -> None:
        """StoreError when the store already holds features of another trunk, normalisation or dtype."""
        found = self.existing_identity()
        if found is not None:
            check_identity(found[0], {**ident, "dtype": dtype}, found[1])

    def complete_and_current(self, video: str, frame_names: Sequence[str], ident: Mapping[str, Any]) -> bool:
        """True when `video` is complete with exactly these frames; StoreError when it was written with
        another identity; False when it must be (re)written."""
        path = self.root / video / METADATA
        try:
            meta = _read_json(path)
        except (FileNotFoundError, StoreError):
            return False
        check_identity(meta, ident, str(path))
        return meta.get("frame_names") == list(frame_names)

    def begin_video(
        self,
        video: str,
        *,
        frame_names: Sequence[str],
        feature_shape: Sequence[int],
        dtype: str,
        ident: Mapping[str, Any],
        shard_frames: int = 16,
        clevel: int = 3,
        extra: Mapping[str, Any] | None = None,
    ) -> VideoWriter:
        """Start (re)writing `video`: whatever was there is removed first, metadata before data."""
        if dtype not in DTYPES:
            raise StoreError(f"embedding dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if not frame_names:
            raise StoreError(f"video {video!r} has no frames to store")
        folder = self.root / video
        shape = [len(frame_names), *(int(s) for s in feature_shape)]
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "video": video,
            "num_frames": len(frame_names),
            "frame_names": list(frame_names),
            "shape": shape,
            "dtype": dtype,
            "layout": LAYOUT,
            "array": ARRAY,
            "shard_frames": int(shard_frames),
            "compression": {"codec": "blosc", "cname": "zstd", "clevel": int(clevel), "shuffle": "byte"},
            **dict(ident),
            **dict(extra or {}),
        }
        if dtype == "int8":
            meta["scales"] = SCALES
        with _writing(f"video {video!r} into the embedding store {self.root} ({folder})", _VIDEO_NOT_WRITTEN):
            (folder / METADATA).unlink(missing_ok=True)
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
        return VideoWriter(folder, meta, shard_frames, clevel)

    def write_global_metadata(self, record: Mapping[str, Any]) -> Path:
        path = self.root / GLOBAL_METADATA
        with _writing(str(path), "; the videos written are kept: a re-run of `es3 embed` writes it"):
            write_json_atomic(path, {"format": FORMAT, "version": VERSION, **dict(record)})
        return path


class VideoWriter:
    """Writes one video's frames in order, whole shards at a time, and its metadata last. A failed
    write is a StoreWriteError; the caller `abort`s the video, which was never marked complete."""

    def __init__(self, folder: Path, meta: dict, shard_frames: int, clevel: int):
        self.folder, self.meta = folder, meta
        self.num_frames = meta["num_frames"]
        self.shard = meta["shard_frames"]
        self._dtype = DTYPES[meta["dtype"]]
        context = _context()
        self._scales = None
        with self._write_errors():
            spec = _array_spec(folder / ARRAY, meta["shape"], meta["dtype"], shard_frames, clevel)
            self._array = ts.open(spec, create=True, context=context).result()
            if meta["dtype"] == "int8":
                shape = [meta["shape"][0], meta["shape"][-1]]
                spec = _array_spec(folder / SCALES, shape, "float32", shard_frames, clevel)
                self._scales = ts.open(spec, create=True, context=context).result()
        self._pending: list[np.ndarray] = []
        self._pending_scales: list[np.ndarray] = []
        self._buffered = 0
        self._written = 0
        self._futures: list[Any] = []

    def _write_errors(self):
        where = f"video {self.folder.name!r} into the embedding store {self.folder.parent} ({self.folder})"
        return _writing(where, _VIDEO_NOT_WRITTEN)

    @property
    def frames_received(self) -> int:
        return self._written + self._buffered

    def write(self, start: int, features: np.ndarray) -> None:
        """Frames `[start, start + n)` as `[n, h, w, C]`; calls must follow frame order."""
        if start != self.frames_received:
            raise ValueError(
                f"{self.folder.name}: frames arrive out of order ({start} != {self.frames_received})"
            )
        n = features.shape[0]
        if start + n > self.num_frames or list(features.shape[1:]) != self.meta["shape"][1:]:
            raise ValueError(
                f"{self.folder.name}: block {features.shape} at {start} does not fit {self.meta['shape']}"
            )
        if self._scales is not None:
            q, scales = quantize(features)
            self._pending.append(q)
            self._pending_scales.append(scales)
        else:
            self._pending.append(np.asarray(features).astype(self._dtype, copy=False))
        self._buffered += n
        while self._buffered >= self.shard or (self._buffered and self.frames_received == self.num_frames):
            self._flush_shard()

    def _flush_shard(self) -> None:
        n = min(self.shard, self._buffered)
        lo = self._written
        self._pending = self._write_block(self._array, self._pending, lo, n)
        if self._scales is not None:
            self._pending_scales = self._write_block(self._scales, self._pending_scales, lo, n)
        self._buffered -= n
        self._written += n

    def _write_block(self, array, pending: list[np.ndarray], lo: int, n: int) -> list[np.ndarray]:
        """Write the first `n` pending frames at `lo`; returns what is left pending."""
        block = np.concatenate(pending) if len(pending) > 1 else pending[0]
        with self._write_errors():
            self._futures.append(array[lo : lo + n].write(block[:n]))
        rest = block[n:]
        return [rest] if rest.shape[0] else []

    def commit(self) -> dict:
        """Wait for the data, then publish the metadata (the video becomes complete); returns it."""
        if self.frames_received != self.num_frames:
            raise ValueError(
                f"{self.folder.name}: {self.frames_received} of {self.num_frames} frames written"
            )
        meta = {**self.meta, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with self._write_errors():
            for f in self._futures:
                f.result()
            self._futures = []
            write_json_atomic(self.folder / METADATA, meta)
        return meta

    def abort(self) -> None:
        """Drop the partial video (it was never visible as complete)."""
        for f in self._futures:
            with contextlib.suppress(Exception):  # the data is being thrown away
                f.result()
        self._futures = []
        shutil.rmtree(self.folder, ignore_errors=True)
