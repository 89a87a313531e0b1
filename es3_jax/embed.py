"""The embedding job behind `es3 embed`: trunk features of every video frame into the EmbeddingStore.

Video i of the sorted list goes to process i mod N (the seed's rule); every process writes only
its own videos and process 0 writes `global_metadata.json` once all have finished. A re-run skips
videos that are complete with the same frames and redoes the others; a store written with
another trunk, normalisation or dtype is refused. Frames of consecutive videos are packed into
fixed-size batches (one compiled shape), so the stored features do not depend on how the run
was split or resumed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from es3_jax.config import Config, to_dict
from es3_jax.data.embedding_store import EmbeddingStore, StoreError, VideoWriter, identity
from es3_jax.data.frames import FrameError, VideoFrames, list_videos, load_frame_uint8, normalize

ON_ERROR = ("stop", "skip")
# How long process 0 waits for the others to finish their videos (they may have far more work).
BARRIER_TIMEOUT_S = 7 * 24 * 3600


@dataclasses.dataclass
class EmbedResult:
    """What one process did."""

    written: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # video -> error
    frames: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


FeaturesFn = Callable[[np.ndarray], Any]  # uint8 [B, S, S, 3] -> features [B, h, w, C] (jax or numpy)


def _load_stream(
    videos: Sequence[VideoFrames], image_size: int, workers: int, prefetch: int
) -> Iterator[tuple[int, int, Any]]:
    """(video position, frame index, (uint8 image, (H, W)) or FrameError) for every frame, in order,
    decoded by a thread pool `prefetch` frames ahead."""

    def load(path: Path):
        try:
            return load_frame_uint8(path, image_size)
        except FrameError as e:
            return e

    jobs = ((v, f, path) for v, video in enumerate(videos) for f, path in enumerate(video.paths))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        queue: collections.deque = collections.deque()
        for v, f, path in jobs:
            queue.append((v, f, pool.submit(load, path)))
            if len(queue) >= prefetch:
                v0, f0, fut = queue.popleft()
                yield v0, f0, fut.result()
        while queue:
            v0, f0, fut = queue.popleft()
            yield v0, f0, fut.result()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    # disable=None: shown only on a terminal.
    return tqdm(total=total, desc=desc, unit="frame", file=sys.stderr, disable=None if enabled else True)


def embed_videos(
    store: EmbeddingStore,
    videos: Sequence[VideoFrames],
    features_fn: FeaturesFn,
    *,
    ident: dict,
    feature_shape: Sequence[int],
    batch_size: int,
    dtype: str = "bfloat16",
    shard_frames: int = 16,
    clevel: int = 3,
    on_error: str = "stop",
    extra_meta: dict | None = None,
    progress: bool = True,
    desc: str = "embed",
    workers: int | None = None,
) -> EmbedResult:
    """Compute and store the features of `videos` (this process's share), skipping complete ones.

    `features_fn` maps a full batch of `batch_size` resized uint8 frames to features
    `[batch_size, *feature_shape]`; the last batch is padded with zero frames. With
    `on_error="stop"` an unreadable frame raises FrameError naming it (videos already stored stay);
    with "skip" its video is dropped and reported in `EmbedResult.failed`.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    start_time = time.perf_counter()
    result = EmbedResult()
    todo = []
    for video in videos:
        if store.complete_and_current(video.name, video.stems, ident):
            result.skipped.append(video.name)
        else:
            todo.append(video)
    if not todo:
        return result
    image_size = int(ident["image_size"])
    writers: dict[int, VideoWriter] = {}
    failed: set[int] = set()
    inflight: collections.deque = collections.deque()
    batch: list[tuple[int, int, np.ndarray]] = []
    bar = _progress(sum(len(v) for v in todo), desc, progress)
    bar.set_postfix_str(f"videos 0/{len(todo)}")

    def fail(v: int, error: Exception) -> None:
        failed.add(v)
        writer = writers.pop(v, None)
        if writer is not None:
            writer.abort()
        result.failed[todo[v].name] = str(error)

    def submit() -> None:
        images = np.zeros((batch_size, image_size, image_size, 3), np.uint8)
        for j, (_, _, image) in enumerate(batch):
            images[j] = image
        inflight.append(([(v, f) for v, f, _ in batch], features_fn(images)))
        batch.clear()

    def drain() -> None:
        items, out = inflight.popleft()
        host = np.asarray(out)
        for j, (v, f) in enumerate(items):
            if v in failed:
                continue
            writer = writers[v]
            writer.write(f, host[j : j + 1])
            result.frames += 1
            bar.update(1)
            if writer.frames_received == writer.num_frames:
                writer.commit()
                del writers[v]
                result.written.append(todo[v].name)
                bar.set_postfix_str(f"videos {len(result.written) + len(result.failed)}/{len(todo)}")

    try:
        workers = workers or min(16, os.cpu_count() or 1)
        for v, f, loaded in _load_stream(todo, image_size, workers, prefetch=2 * batch_size + workers):
            if v in failed:
                continue
            if isinstance(loaded, FrameError):
                fail(v, loaded)
                batch[:] = [item for item in batch if item[0] != v]
                if on_error == "stop":
                    # Finish the videos already loaded in full, then stop naming the file.
                    if batch:
                        submit()
                    while inflight:
                        drain()
                    raise loaded
                continue
            image, orig_size = loaded
            if f == 0:
                writers[v] = store.begin_video(
                    todo[v].name,
                    frame_names=todo[v].stems,
                    feature_shape=feature_shape,
                    dtype=dtype,
                    ident=ident,
                    shard_frames=shard_frames,
                    clevel=clevel,
                    extra={"source": str(todo[v].folder), "orig_size": list(orig_size), **(extra_meta or {})},
                )
            batch.append((v, f, image))
            if len(batch) == batch_size:
                submit()
                # Keep one batch computing on the device while the previous one is written.
                if len(inflight) > 1:
                    drain()
        if batch:
            submit()
        while inflight:
            drain()
    finally:
        bar.close()
        for writer in writers.values():  # interrupted: nothing half-written may stay behind
            writer.abort()
    result.seconds = time.perf_counter() - start_time
    return result


# ---- multi-process coordination -------------------------------------------------------------------


def _client():
    # The coordination service of jax.distributed (as orbax and maxtext use it): a barrier and a
    # key-value store that wait for slow processes without holding a device collective open.
    from jax._src import distributed

    return distributed.global_state.client


def gather_results(result: EmbedResult, process_index: int, process_count: int) -> list[dict] | None:
    """Every process's result on process 0 (None elsewhere), once all have finished."""
    if process_count == 1:
        return [result.to_json()]
    client = _client()
    client.key_value_set(f"es3_embed/result/{process_index}", json.dumps(result.to_json()))
    client.wait_at_barrier("es3_embed_done", BARRIER_TIMEOUT_S * 1000)
    if process_index != 0:
        return None
    return [
        json.loads(client.blocking_key_value_get(f"es3_embed/result/{i}", 60_000))
        for i in range(process_count)
    ]


def global_record(
    store: EmbeddingStore,
    videos: Sequence[str],
    results: Sequence[dict],
    *,
    ident: dict,
    dtype: str,
    feature_shape: Sequence[int],
    extra: dict,
) -> dict:
    """The global metadata: the listed videos that are complete, those that failed, the settings."""
    complete = [v for v in videos if store.is_complete(v)]
    failed = {k: e for r in results for k, e in r["failed"].items()}
    return {
        **ident,
        "dtype": dtype,
        "feature_shape": list(feature_shape),
        "layout": "THWC",
        "num_videos": len(videos),
        "num_complete": len(complete),
        "num_processes": len(results),
        "videos": complete,
        "failed": [{"video": k, "error": failed[k]} for k in sorted(failed)],
        **extra,
    }


def publish_global(store: EmbeddingStore, record: dict) -> bool:
    """Write the global metadata unless it already says exactly this (a re-run that did nothing)."""
    old = store.global_metadata()
    if old is not None and {k: v for k, v in old.items() if k not in ("format", "version")} == record:
        return False
    store.write_global_metadata(record)
    return True


# ---- the command -----------------------------------------------------------------------------------


def _trunk(cfg: Config, sam3_weights: str | None, seed: int, dtype):
    from es3_jax.models.trunk import trunk_fingerprint, trunk_from_config
    from es3_jax.params import param_dict

    if sam3_weights:
        from porting.sam3_checkpoint import port_trunk

        params = port_trunk(sam3_weights)
        return trunk_from_config(cfg, params, dtype=dtype), trunk_fingerprint(params)
    trunk = trunk_from_config(cfg, seed=seed, dtype=dtype)
    return trunk, trunk_fingerprint(param_dict(trunk))


def make_features_fn(
    trunk, mean: Sequence[float], std: Sequence[float], store_dtype: str, devices
) -> FeaturesFn:
    """uint8 frames -> stored-dtype features, jit-compiled, the batch split over `devices`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(trunk)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    # An int8 store quantizes on the host (VideoWriter), from float32 features.
    out_dtype = jnp.dtype(jnp.float32 if store_dtype == "int8" else store_dtype)

    @jax.jit
    def features(state, images):
        model = nnx.merge(graphdef, state)
        return model(normalize(images, mean, std)).astype(out_dtype)

    return lambda images: features(state, jax.device_put(images, batch_sharding))


def run(
    cfg: Config,
    data_dir: str,
    output_dir: str,
    *,
    batch_size: int = 8,
    sam3_weights: str | None = None,
    on_error: str = "stop",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """`es3 embed`: the whole job for this process -> a summary. Joins the other processes first."""
    from es3_jax import distributed

    rank, nproc = distributed.initialize()
    import jax

    from es3_jax.models.trunk import compute_dtype

    data = cfg.DATA
    if batch_size < 1:
        raise StoreError(f"--batch_size must be at least 1, got {batch_size}")
    all_videos = list_videos(data_dir)
    mine = [v for i, v in enumerate(all_videos) if i % nproc == rank]
    trunk, fingerprint = _trunk(cfg, sam3_weights, seed, compute_dtype(cfg.MODEL.COMPUTE_DTYPE))
    ident = identity(fingerprint, data.PIXEL_MEAN, data.PIXEL_STD, cfg.MODEL.TEACHER.IMAGE_SIZE)
    store = EmbeddingStore(output_dir)
    store.check_writable(ident, data.EMBEDDING_DTYPE)
    devices = jax.local_devices()
    grid = trunk.grid
    feature_shape = (grid, grid, cfg.MODEL.TRUNK.WIDTH)
    settings = {
        "backbone_stride": cfg.MODEL.TRUNK.PATCH_SIZE,
        "trunk_config": to_dict(cfg.MODEL.TRUNK),
        "trunk_weights": str(sam3_weights) if sam3_weights else f"random (seed {seed})",
    }
    result = embed_videos(
        store,
        mine,
        make_features_fn(trunk, data.PIXEL_MEAN, data.PIXEL_STD, data.EMBEDDING_DTYPE, devices),
        ident=ident,
        feature_shape=feature_shape,
        batch_size=batch_size * len(devices),
        dtype=data.EMBEDDING_DTYPE,
        shard_frames=data.EMBEDDING_SHARD_FRAMES,
        clevel=data.EMBEDDING_CLEVEL,
        on_error=on_error,
        extra_meta=settings,
        progress=progress,
        desc=f"embed [{rank}/{nproc}]" if nproc > 1 else "embed",
    )
    results = gather_results(result, rank, nproc)
    summary = {"process": rank, "processes": nproc, **result.to_json()}
    if results is not None:
        record = global_record(
            store,
            [v.name for v in all_videos],
            results,
            ident=ident,
            dtype=data.EMBEDDING_DTYPE,
            feature_shape=feature_shape,
            extra={
                "data_dir": str(Path(data_dir).resolve()),
                "shard_frames": data.EMBEDDING_SHARD_FRAMES,
                **settings,
            },
        )
        summary["global_metadata_written"] = publish_global(store, record)
        summary["complete"] = record["num_complete"]
        summary["total_videos"] = record["num_videos"]
        summary["failed_all"] = record["failed"]
    return summary


def run_import(
    cfg: Config,
    src: str,
    output_dir: str,
    *,
    sam3_weights: str | None = None,
    on_error: str = "stop",
) -> dict:
    """`es3 embed --import_pt`: a seed-format folder into the store, without recomputing anything.

    The trunk identity is the fingerprint of `sam3_weights`' trunk when given, else "unknown"; the
    normalisation recorded is `DATA.PIXEL_MEAN/STD` (state the seed's ImageNet values if it used them).
    """
    from es3_jax import distributed
    from porting.seed_embeddings import import_seed_folder

    rank, nproc = distributed.initialize()
    trunk = "unknown"
    if sam3_weights:
        from es3_jax.models.trunk import trunk_fingerprint
        from porting.sam3_checkpoint import port_trunk

        trunk = trunk_fingerprint(port_trunk(sam3_weights))
    data = cfg.DATA
    store = EmbeddingStore(output_dir)
    result, names, ident = import_seed_folder(
        src,
        store,
        trunk=trunk,
        pixel_mean=data.PIXEL_MEAN,
        pixel_std=data.PIXEL_STD,
        dtype=data.EMBEDDING_DTYPE,
        shard_frames=data.EMBEDDING_SHARD_FRAMES,
        clevel=data.EMBEDDING_CLEVEL,
        on_error=on_error,
        process_index=rank,
        process_count=nproc,
    )
    results = gather_results(result, rank, nproc)
    summary = {"process": rank, "processes": nproc, **result.to_json()}
    if results is not None:
        complete = [n for n in names if store.is_complete(n)]
        shape = store.metadata(complete[0])["shape"][1:] if complete else []
        record = global_record(
            store,
            names,
            results,
            ident=ident,
            dtype=data.EMBEDDING_DTYPE,
            feature_shape=shape,
            extra={"imported_from": str(Path(src).resolve()), "shard_frames": data.EMBEDDING_SHARD_FRAMES},
        )
        summary["global_metadata_written"] = publish_global(store, record)
        summary["complete"] = record["num_complete"]
        summary["total_videos"] = record["num_videos"]
        summary["failed_all"] = record["failed"]
    return summary
