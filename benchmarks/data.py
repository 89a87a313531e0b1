"""Input pipeline throughput: clips/s and MB/s with W worker processes, beside one training step's needs.

Reads a given embedding store and SA-V folder (`--config` / overrides: DATA.EMBEDDING_DIR, DATA.SAV_ROOT),
or (by default when the one read is not there, or with --synthetic) writes synthetic SA-V videos and a
store of random trunk features of the config's geometry (MODEL.TEACHER.IMAGE_SIZE // BACKBONE_STRIDE
squared x TRUNK_DIM). Random features do not compress, so disk reads are a worst case. `--from_frames` reads the JPEGs instead (DATA.USE_PRECOMPUTED
False), `--augment` augments them (DATA.AUG), `--sa1b W` mixes in synthetic SA-1B pseudo-videos at
weight W; `--height/--width` set the synthetic frames' size, where augmentation works. Each record is
one worker count: the pipeline's sustained rate after warm-up, the bytes one per-process batch
carries (what one training step consumes), and the training steps per second that rate could feed.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from es3_jax.commands.common import add_config_args, load_config
from es3_jax.errors import Es3Error

HELP = "data pipeline: clips/s and MB/s with W workers, against one training step's consumption"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", default="0,2", help="worker process counts to measure, comma-separated")
    p.add_argument("--batch", type=int, default=0, help="per-process batch (default: TRAIN.BATCH_SIZE)")
    p.add_argument("--batches", type=int, default=6, help="batches timed per worker count, after warm-up")
    p.add_argument("--warmup", type=int, default=2, help="batches read before timing (worker start-up)")
    p.add_argument("--videos", type=int, default=4, help="synthetic videos when no store is given")
    p.add_argument("--frames", type=int, default=12, help="annotated frames per synthetic video")
    p.add_argument(
        "--synthetic", action="store_true", help="measure synthetic data even when DATA.EMBEDDING_DIR is set"
    )
    p.add_argument("--dir", default=None, help="where to write the synthetic data (default: a temp folder)")
    p.add_argument(
        "--from_frames", action="store_true", help="read frames, not embeddings (DATA.USE_PRECOMPUTED False)"
    )
    p.add_argument("--augment", action="store_true", help="augment the frames (DATA.AUG.ENABLED; implies --from_frames)")
    p.add_argument(
        "--sa1b", type=float, default=0.0, help="mix synthetic SA-1B pseudo-videos at this weight (implies --from_frames)"
    )
    p.add_argument("--height", type=int, default=240, help="synthetic frame / image height")
    p.add_argument("--width", type=int, default=320, help="synthetic frame / image width")
    add_config_args(p)


def _synthetic(cfg, root: Path, videos: int, frames: int, height: int, width: int, store: bool = True):
    """Synthetic SA-V videos and (with `store`) a store of random features for them; returns the config
    pointing there."""
    from es3_jax.data import embedding_store, synthetic
    from es3_jax.data.videos import numbered_frame_stems

    t = cfg.MODEL.TEACHER
    grid = t.IMAGE_SIZE // t.BACKBONE_STRIDE
    synthetic.make_synthetic(root / "frames", videos, num_frames=frames, height=height, width=width)
    data = dataclasses.replace(cfg.DATA, SAV_ROOT=str(root / "frames"), VAL_VIDEOS=0, VAL_SPLIT=0.0)
    if not store:
        return dataclasses.replace(cfg, DATA=data)
    store = embedding_store.EmbeddingStore(root / "store")
    ident = embedding_store.identity("random", cfg.DATA.PIXEL_MEAN, cfg.DATA.PIXEL_STD, t.IMAGE_SIZE)
    rng = np.random.default_rng(0)
    for name in sorted(p.name for p in (root / "frames").iterdir() if p.is_dir()):
        stems = numbered_frame_stems(root / "frames" / name)
        w = store.begin_video(
            name,
            frame_names=stems,
            feature_shape=(grid, grid, t.TRUNK_DIM),
            dtype=cfg.DATA.EMBEDDING_DTYPE,
            ident=ident,
            shard_frames=cfg.DATA.EMBEDDING_SHARD_FRAMES,
            clevel=cfg.DATA.EMBEDDING_CLEVEL,
        )
        for i in range(len(stems)):
            w.write(i, rng.standard_normal((1, grid, grid, t.TRUNK_DIM), np.float32))
        w.commit()
    return dataclasses.replace(cfg, DATA=dataclasses.replace(data, EMBEDDING_DIR=str(root / "store")))


def _measure(cfg, workers: int, batch: int, batches: int, warmup: int) -> dict:
    from es3_jax.data import pipeline

    pipe = pipeline.build_pipeline(
        cfg, batch_size=batch, process_index=0, process_count=1, num_workers=workers
    )
    it = iter(pipe)
    try:
        start = time.perf_counter()
        first = next(it)
        for _ in range(warmup - 1):
            next(it)
        startup = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        secs = time.perf_counter() - start
    finally:
        if hasattr(it, "close"):
            it.close()
    step_mb = sum(v.nbytes for v in first.values()) / 1e6
    features = "embeddings" if "embeddings" in first else "images"
    return {
        "workers": workers,
        "batch": batch,
        "clips/s": batches * batch / secs,
        "MB/s": batches * step_mb / secs,
        "MB/step": step_mb,
        f"{features} MB/step": first[features].nbytes / 1e6,
        "masks MB/step": first["masks"].nbytes / 1e6,
        "steps/s fed": batches / secs,
        "warmup_s": startup,
    }


def _frames(cfg, root: Path, args: argparse.Namespace):
    """The config reading frames (augmented with --augment), mixed with synthetic SA-1B images with --sa1b."""
    from es3_jax import config as config_lib
    from es3_jax.data import synthetic

    overrides = ["DATA.USE_PRECOMPUTED", "False", "DATA.AUG.ENABLED", str(args.augment)]
    if args.sa1b > 0:
        # Enough images that the epoch is as long as the videos allow.
        images = max(args.batch or cfg.TRAIN.BATCH_SIZE, round(args.videos * args.sa1b / (1 - args.sa1b)) + 1)
        synthetic.make_sa1b(root / "sa1b", images, height=args.height, width=args.width)
        overrides += ["DATA.SA1B.ROOT", str(root / "sa1b"), "DATA.SOURCES", "[sav, sa1b]"]
        overrides += ["DATA.SOURCE_WEIGHTS", f"[{1 - args.sa1b}, {args.sa1b}]"]
    return config_lib.apply_overrides(cfg, overrides)


def run(args: argparse.Namespace) -> list[dict]:
    cfg = load_config(args)
    batch = args.batch or cfg.TRAIN.BATCH_SIZE
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if not 0 <= args.sa1b < 1:
        raise Es3Error(f"--sa1b {args.sa1b}: a weight in [0, 1)")
    frames = args.from_frames or args.augment or args.sa1b > 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        given = Path(cfg.DATA.SAV_ROOT).is_dir() if frames else bool(cfg.DATA.EMBEDDING_DIR)
        if args.synthetic or not given:
            cfg = _synthetic(cfg, Path(tmp), args.videos, args.frames, args.height, args.width, store=not frames)
        if frames:
            cfg = _frames(cfg, Path(tmp), args)
        t = cfg.MODEL.TEACHER
        grid = t.IMAGE_SIZE // t.BACKBONE_STRIDE
        records = []
        for w in workers:
            r = _measure(cfg, w, batch, args.batches, args.warmup)
            source = "embeddings" if cfg.DATA.USE_PRECOMPUTED else f"frames {args.height}x{args.width}"
            source += " augmented" if cfg.DATA.AUG.ENABLED else ""
            source += f" + SA-1B {args.sa1b:g}" if args.sa1b > 0 else ""
            records.append(
                {
                    "config": f"{t.IMAGE_SIZE}px {grid}x{grid}x{t.TRUNK_DIM} T={cfg.DATA.NUM_FRAMES} "
                    f"O={cfg.DATA.MAX_OBJECTS} masks {cfg.DATA.MASK_SIZE or t.IMAGE_SIZE}",
                    "input": source,
                    **r,
                }
            )
    return records
