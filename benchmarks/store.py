"""Embedding store throughput and size: write and read MB/s and frames/s, bytes per frame on disk.

Synthetic features by default (Gaussian, per-channel log-normal scales; real trunk features may
compress differently): pass --store to measure reads and bytes per frame of an existing store.
The size reference is the seed's float32 `.pt` per frame of the same shape ([1024, 72, 72] · 4 B ≈
21.2 MB at SAM3 geometry).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

HELP = "embedding store: write/read MB/s and frames/s, bytes per frame against the seed's .pt"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=32, help="frames of the synthetic video")
    p.add_argument("--grid", type=int, default=72, help="feature grid side (72 at 1008 px)")
    p.add_argument("--channels", type=int, default=1024, help="feature channels (trunk width)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="stored dtypes to measure, comma-separated")
    p.add_argument("--clip", type=int, default=8, help="frames per random read (a training clip)")
    p.add_argument("--reads", type=int, default=20, help="random clip reads to time")
    p.add_argument("--store", default=None, help="measure an existing store instead of synthetic data")
    p.add_argument("--dir", default=None, help="where to write the synthetic stores (default: a temp folder)")
    p.add_argument("--seed", type=int, default=0)


def _disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _read_records(store, videos: list[str], label: str, clip: int, reads: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    meta = store.metadata(videos[0])
    frame_bytes = int(np.prod(meta["shape"][1:])) * np.dtype(store.read(videos[0], [0]).dtype).itemsize
    pt_bytes = int(np.prod(meta["shape"][1:])) * 4
    frames = sum(store.metadata(v)["num_frames"] for v in videos)
    disk = sum(_disk_bytes(store.root / v) for v in videos)
    records = []
    for case, n in (("read clip", clip), ("read frame", 1)):
        times = []
        for _ in range(reads):
            v = videos[rng.integers(len(videos))]
            t = store.metadata(v)["num_frames"]
            idx = np.sort(rng.choice(t, size=min(n, t), replace=False))
            start = time.perf_counter()
            store.read(v, idx)
            times.append((time.perf_counter() - start, len(idx)))
        secs = sum(s for s, _ in times)
        count = sum(k for _, k in times)
        records.append(
            {
                "case": f"{case} ({n} random frames)",
                "data": label,
                "dtype": meta["dtype"],
                "frames/s": count / secs,
                "MB/s": count * frame_bytes / secs / 1e6,
                "median_ms": float(np.median([s * 1e3 for s, _ in times])),
                "bytes/frame": disk / frames,
                "x smaller than f32 .pt": pt_bytes / (disk / frames),
            }
        )
    return records


def run(args: argparse.Namespace) -> list[dict]:
    from es3_jax.data.embedding_store import EmbeddingStore, identity

    if args.store:
        store = EmbeddingStore(args.store)
        videos = store.videos()
        if not videos:
            raise SystemExit(f"no complete videos in {args.store}")
        return _read_records(store, videos, f"store {args.store}", args.clip, args.reads, args.seed)

    rng = np.random.default_rng(args.seed)
    shape = (args.frames, args.grid, args.grid, args.channels)
    scales = np.exp(rng.normal(0.0, 1.0, args.channels)).astype(np.float32)
    features = rng.standard_normal(shape, dtype=np.float32) * scales
    ident = identity("benchmark", (0.5,) * 3, (0.5,) * 3, args.grid * 14)
    records = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for dtype in args.dtypes.split(","):
            store = EmbeddingStore(Path(tmp) / dtype)
            stems = [f"{i:05d}" for i in range(args.frames)]
            start = time.perf_counter()
            writer = store.begin_video(
                "synthetic", frame_names=stems, feature_shape=shape[1:], dtype=dtype, ident=ident
            )
            for i in range(0, args.frames, 8):
                writer.write(i, features[i : i + 8])
            writer.commit()
            secs = time.perf_counter() - start
            raw = features.size * np.dtype(store.read("synthetic", [0]).dtype).itemsize
            disk = _disk_bytes(store.root / "synthetic")
            records.append(
                {
                    "case": f"write ({args.frames} frames)",
                    "data": "synthetic",
                    "dtype": dtype,
                    "frames/s": args.frames / secs,
                    "MB/s": raw / secs / 1e6,
                    "median_ms": secs * 1e3,
                    "bytes/frame": disk / args.frames,
                    "x smaller than f32 .pt": features[0].size * 4 / (disk / args.frames),
                }
            )
            records += _read_records(
                EmbeddingStore(store.root), ["synthetic"], "synthetic", args.clip, args.reads, args.seed
            )
    return records
