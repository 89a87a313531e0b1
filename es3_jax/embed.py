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
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax._src import distributed as jax_distributed

from es3_jax import distributed
from es3_jax.config import Config, to_dict
from es3_jax.data.embedding_store import EmbeddingStore, StoreError, StoreWriteError, VideoWriter, identity
from es3_jax.data.frames import FrameError, VideoFrames, list_videos, load_frame_uint8, normalize
from es3_jax.data.seed_embeddings import SeedFrameReader, list_seed_videos, load_seed_frame
from es3_jax.models.stage1.stage1_trunk import Stage1Trunk
from es3_jax.models.trunk import ViTTrunk, compute_dtype, trunk_fingerprint, trunk_from_config
from es3_jax.progress import progress_bar
from es3_jax.weights import Weights

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
    with "skip" its video is dropped and reported in `EmbedResult.failed`. A store that cannot be
    written (a full disk) raises StoreWriteError whatever `on_error` says: the videos already stored
    stay, the one being written is removed.
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
    bar = progress_bar(sum(len(v) for v in todo), desc, enabled=progress)
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
    return jax_distributed.global_state.client


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


def features_program(
    trunk: ViTTrunk | Stage1Trunk, mean: Sequence[float], std: Sequence[float], store_dtype: str
) -> tuple[Callable, nnx.State]:
    """(`features(state, images)`: uint8 frames `[B, S, S, 3]` -> stored-dtype features
    `[B, h, w, C]`, jit-compiled; the trunk's state it takes)."""
    graphdef, state = nnx.split(trunk)
    # An int8 store quantizes on the host (VideoWriter), from float32 features.
    out_dtype = jnp.dtype(jnp.float32 if store_dtype == "int8" else store_dtype)

    @jax.jit
    def features(state, images):
        model = nnx.merge(graphdef, state)
        return model(normalize(images, mean, std)).astype(out_dtype)

    return features, state


def make_features_fn(
    trunk: ViTTrunk | Stage1Trunk, mean: Sequence[float], std: Sequence[float], store_dtype: str, devices
) -> FeaturesFn:
    """uint8 frames -> stored-dtype features, jit-compiled, the batch split over `devices`."""
    features, state = features_program(trunk, mean, std, store_dtype)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return lambda images: features(state, jax.device_put(images, batch_sharding))


def _publish(
    store: EmbeddingStore,
    result: EmbedResult,
    rank: int,
    nproc: int,
    names: Sequence[str],
    *,
    ident: dict,
    dtype: str,
    feature_shape: Sequence[int],
    extra: dict,
) -> dict:
    """This process's summary; on process 0, once every process is done, the global metadata too."""
    results = gather_results(result, rank, nproc)
    summary = {"process": rank, "processes": nproc, **result.to_json()}
    if results is not None:
        record = global_record(
            store, names, results, ident=ident, dtype=dtype, feature_shape=feature_shape, extra=extra
        )
        summary["global_metadata_written"] = publish_global(store, record)
        summary["complete"] = record["num_complete"]
        summary["total_videos"] = record["num_videos"]
        summary["failed_all"] = record["failed"]
    return summary


def run(
    cfg: Config,
    data_dir: str,
    output_dir: str,
    *,
    weights: Weights,
    batch_size: int = 8,
    on_error: str = "stop",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """`es3 embed`: the whole job for this process -> a summary. Joins the other processes first.

    weights: where the trunk comes from (`es3_jax.weights.load`); random weights draw the trunk
    from `seed`.
    """
    rank, nproc = distributed.initialize()
    data = cfg.DATA
    if batch_size < 1:
        raise StoreError(f"--batch_size must be at least 1, got {batch_size}")
    all_videos = list_videos(data_dir)
    mine = [v for i, v in enumerate(all_videos) if i % nproc == rank]
    params = weights.trunk_params(seed)
    trunk = trunk_from_config(cfg, params, dtype=compute_dtype(cfg.MODEL.COMPUTE_DTYPE))
    ident = identity(
        trunk_fingerprint(params),
        data.PIXEL_MEAN,
        data.PIXEL_STD,
        cfg.MODEL.TEACHER.IMAGE_SIZE,
        cfg.MODEL.TRUNK.KIND,
    )
    store = EmbeddingStore(output_dir)
    store.check_writable(ident, data.EMBEDDING_DTYPE)
    devices = jax.local_devices()
    feature_shape = (trunk.grid, trunk.grid, cfg.MODEL.TEACHER.TRUNK_DIM)
    settings = {
        "backbone_stride": cfg.MODEL.TRUNK.PATCH_SIZE,
        "trunk_config": to_dict(cfg.MODEL.TRUNK),
        "trunk_weights": weights.source,
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
    return _publish(
        store,
        result,
        rank,
        nproc,
        [v.name for v in all_videos],
        ident=ident,
        dtype=data.EMBEDDING_DTYPE,
        feature_shape=feature_shape,
        extra={
            "data_dir": str(Path(data_dir).resolve()),
            "shard_frames": data.EMBEDDING_SHARD_FRAMES,
            **settings,
        },
    )


# ---- importing a seed-format embeddings folder (es3_jax/data/seed_embeddings.py) -------------------


def import_seed_folder(
    src: str | Path,
    store: EmbeddingStore,
    *,
    read_pt: SeedFrameReader,
    trunk: str,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    dtype: str = "bfloat16",
    shard_frames: int = 16,
    clevel: int = 3,
    on_error: str = "stop",
    process_index: int = 0,
    process_count: int = 1,
    trunk_kind: str = "sam3_vit",
) -> tuple[EmbedResult, list[str], dict]:
    """Copy this process's share of the seed videos (video i -> process i mod N) into `store`.

    -> (result, names of all seed videos, identity). Complete videos with the same frames are skipped.
    """
    start = time.perf_counter()
    videos = list_seed_videos(src)
    image_sizes = {int(v.meta.get("image_size", 1008)) for v in videos}
    if len(image_sizes) != 1:
        raise StoreError(f"{src}: videos were embedded at different image sizes {sorted(image_sizes)}")
    ident = identity(trunk, pixel_mean, pixel_std, image_sizes.pop(), trunk_kind)
    store.check_writable(ident, dtype)
    result = EmbedResult()
    for i, video in enumerate(videos):
        if i % process_count != process_index:
            continue
        if store.complete_and_current(video.name, video.stems, ident):
            result.skipped.append(video.name)
            continue
        if video.meta.get("completed") is False or not video.stems:
            error = StoreError(f"{video.folder}: the seed marked this video incomplete")
            if on_error == "stop":
                raise error
            result.failed[video.name] = str(error)
            continue
        writer = None
        try:
            for f in range(len(video.stems)):
                frame = load_seed_frame(video.frame_path(f), read_pt)
                if writer is None:
                    writer = store.begin_video(
                        video.name,
                        frame_names=video.stems,
                        feature_shape=frame.shape,
                        dtype=dtype,
                        ident=ident,
                        shard_frames=shard_frames,
                        clevel=clevel,
                        extra={"source": str(video.folder), "imported_from": "seed"},
                    )
                if list(frame.shape) != writer.meta["shape"][1:]:
                    raise StoreError(
                        f"{video.frame_path(f)}: shape {list(frame.shape)} differs from the video's first "
                        f"frame {writer.meta['shape'][1:]} (channels-last)"
                    )
                writer.write(f, frame[None])
            writer.commit()
            writer = None
            result.written.append(video.name)
            result.frames += len(video.stems)
        except StoreError as e:
            if on_error == "stop" or isinstance(e, StoreWriteError):  # a full disk fails every video
                raise
            result.failed[video.name] = str(e)
        finally:
            if writer is not None:
                writer.abort()
    result.seconds = time.perf_counter() - start
    return result, [v.name for v in videos], ident


def run_import(
    cfg: Config,
    src: str,
    output_dir: str,
    *,
    read_pt: SeedFrameReader,
    weights: Weights | None = None,
    on_error: str = "stop",
) -> dict:
    """`es3 embed --import_pt`: a seed-format folder into the store, without recomputing anything.

    The trunk identity is the fingerprint of `weights`' trunk when given, else "unknown"; the
    normalisation recorded is `DATA.PIXEL_MEAN/STD` (state the seed's ImageNet values if it used them).
    """
    rank, nproc = distributed.initialize()
    trunk = "unknown" if weights is None else trunk_fingerprint(weights.trunk_params(0))
    data = cfg.DATA
    store = EmbeddingStore(output_dir)
    result, names, ident = import_seed_folder(
        src,
        store,
        read_pt=read_pt,
        trunk=trunk,
        pixel_mean=data.PIXEL_MEAN,
        pixel_std=data.PIXEL_STD,
        dtype=data.EMBEDDING_DTYPE,
        shard_frames=data.EMBEDDING_SHARD_FRAMES,
        clevel=data.EMBEDDING_CLEVEL,
        on_error=on_error,
        process_index=rank,
        process_count=nproc,
        trunk_kind=cfg.MODEL.TRUNK.KIND,
    )
    complete = [n for n in names if store.is_complete(n)]
    return _publish(
        store,
        result,
        rank,
        nproc,
        names,
        ident=ident,
        dtype=data.EMBEDDING_DTYPE,
        feature_shape=store.metadata(complete[0])["shape"][1:] if complete else [],
        extra={"imported_from": str(Path(src).resolve()), "shard_frames": data.EMBEDDING_SHARD_FRAMES},
    )
