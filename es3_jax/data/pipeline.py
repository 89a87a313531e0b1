"""The training input pipeline (grain): clips -> embeddings or frames + ground-truth masks -> batches.

`build_pipeline` wires the index (`indexing.py`), the sources' mix (`mixing.py`) and the loader of a
clip's arrays (`loading.py`) into a grain dataset.

Batch format (one dict of numpy arrays per process and step; B = per-process batch, T = DATA.NUM_FRAMES,
O = DATA.MAX_OBJECTS, M = DATA.MASK_SIZE or MODEL.TEACHER.IMAGE_SIZE):

| key | shape, dtype | meaning |
|---|---|---|
| `embeddings` | [B, T, h, w, C], store dtype (bf16) | trunk features from the store (DATA.USE_PRECOMPUTED True) |
| `images` | [B, T, S, S, 3] float32 | frames resized to S = MODEL.TEACHER.IMAGE_SIZE, normalised with DATA.PIXEL_MEAN/STD (USE_PRECOMPUTED False); augmented with DATA.AUG.ENABLED (`augment.py`) |
| `masks` | [B, T, O, M, M] bool | ground truth of each object slot on each clip frame, resized like the frames (no crop) |
| `object_valid` | [B, O] bool | slot holds an object (visible on frame 0 of the clip); padded slots are all-False masks |
| `object_ids` | [B, O] int32 | the object's index in its annotation (manual objects first), -1 for padding |
| `video_index` | [B] int32 | index into `Pipeline.videos` (the same list on every process) |
| `source` | [B] int32 | index into `Pipeline.sources` (DATA.SOURCES, or one pool of videos) |
| `frame_indices` | [B, T] int32 | position of each clip frame in the store (or in the video's sorted JPEGs) |
| `frame_numbers` | [B, T] int32 | 24-fps frame number of each clip frame (the JPEG stem) |
| `reversed` | [B] bool | the clip plays backwards |
| `clip_valid` | [B] bool | False only for the padding clips that even out the last validation batch |

Frame 0 of the clip is the conditioning frame: every valid object is visible on it. Each item is read
by its format (`source.py`). An SA-1B image (`sa1b.py`) becomes a clip by `pseudo_video.py`; its
`frame_indices` and `frame_numbers` are 0..T-1 and its `object_ids` index the image's annotations.
Masks are at the model's input resolution because that is where SAM 2 computes its mask losses (the
decoder's low-res logits are upsampled to the image size); DATA.MASK_SIZE trades that for less host
memory.

Ordering and sharding: global step k of the run is epoch k // steps_per_epoch. An epoch is a
permutation of the training videos (with DATA.SOURCES, the sources' shares interleaved:
`clips.mixed_epoch_order`) cut to steps_per_epoch x P x B clips (P processes; the remainder,
different videos each epoch, waits for a later epoch), and global batch k is the clip slots
[k·P·B, (k+1)·P·B) of its epoch. Process p loads the p-th block of B, so the processes read disjoint
clips, the same number of batches, and concatenated in process order they form the global batch,
which therefore does not depend on P. Clips, their augmentation and an image's motion are pure
functions of (seed, epoch, slot) (`es3_jax/data/clips.py`).

Workers: batches are assembled inside `DATA.NUM_WORKERS` spawned grain processes; the embedding store
is pickled without its handles and opens itself inside each worker (TensorStore is not fork-safe).

Resuming: `iterator.get_state()` / `set_state()`, or in orbax
`ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(iterator))` and
`grain.checkpoint.CheckpointRestore(iterator)` on restore; the state is per process, so keep the
process count and DATA.NUM_WORKERS fixed across a resume (`Pipeline.iterator(start_step=k)` is the
stateless alternative). On several processes, create the pipeline after `jax.distributed.initialize`
and turn batches into global arrays with `es3_jax.train.sharding.global_batch`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import grain
import jax
from absl import flags

from es3_jax.data.augment import AugmentSpec
from es3_jax.data.clips import ClipSpec
from es3_jax.data.datasets import source_named
from es3_jax.data.embedding_store import EmbeddingStore
from es3_jax.data.indexing import check_strict, index_dataset
from es3_jax.data.loading import ClipLoader
from es3_jax.data.mixing import mix_sources
from es3_jax.data.source import Entry, PipelineError
from es3_jax.data.videos import Problem

if TYPE_CHECKING:
    from es3_jax.config import Config

SPLITS = ("train", "val")


@dataclasses.dataclass
class Pipeline:
    """A built pipeline: `iter(pipeline)` (or `iterator(start_step)`) yields process-local batches."""

    dataset: Any  # grain.IterDataset
    loader: ClipLoader
    problems: list[Problem]
    num_epochs: int | None
    workers: int
    prefetch: int

    @property
    def videos(self) -> list[str]:
        return [e.name for e in self.loader.entries]

    @property
    def steps_per_epoch(self) -> int:
        return self.loader.steps_per_epoch

    @property
    def sources(self) -> tuple[str, ...]:
        """Names of the sources a batch's `source` indexes."""
        return self.loader.mix.names

    def mixing(self) -> dict[str, float]:
        """The configured mix, for the run's metrics (`SourceMix.record`)."""
        return self.loader.mix.record()

    def __iter__(self):
        return iter(self.dataset)

    def iterator(self, start_step: int = 0):
        """An iterator starting at global step `start_step` (resume without a saved iterator state)."""
        if start_step == 0:
            return iter(self.dataset)
        return iter(_grain_dataset(self.loader, self.num_epochs, self.workers, self.prefetch, start_step))


def _grain_dataset(loader: ClipLoader, num_epochs: int | None, workers: int, prefetch: int, start: int = 0):
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags, even outside absl.app.run
        flags.FLAGS.mark_as_parsed()
    ds = grain.MapDataset.range(loader.steps_per_epoch).repeat(num_epochs)
    ds = ds.map_with_index(loader)
    if start:
        ds = ds[start:]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0 if workers else 2, prefetch_buffer_size=prefetch))
    if workers > 0:
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch)
        )
    return it


def open_store(cfg: Config) -> EmbeddingStore:
    """The embedding store of DATA.EMBEDDING_DIR (opened lazily, per process); it refuses features made
    by another kind of trunk, or with another pixel normalisation or image size than the config's."""
    if not cfg.DATA.EMBEDDING_DIR:
        raise PipelineError("DATA.USE_PRECOMPUTED is True but DATA.EMBEDDING_DIR is empty")
    expect = {
        "trunk_kind": cfg.MODEL.TRUNK.KIND,
        "pixel_mean": list(cfg.DATA.PIXEL_MEAN),
        "pixel_std": list(cfg.DATA.PIXEL_STD),
        "image_size": cfg.MODEL.TEACHER.IMAGE_SIZE,
    }
    return EmbeddingStore(cfg.DATA.EMBEDDING_DIR, expect=expect)


def clip_spec(cfg: Config) -> ClipSpec:
    d = cfg.DATA
    return ClipSpec(
        num_frames=d.NUM_FRAMES,
        frame_skip=d.FRAME_SKIP,
        max_objects=d.MAX_OBJECTS,
        reverse_prob=d.REVERSE_PROB,
    )


def build_pipeline(
    cfg: Config,
    *,
    split: str = "train",
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int | None = None,
    num_epochs: int | None = None,
    seed: int | None = None,
    store: EmbeddingStore | None = None,
    index: tuple[list[Entry], list[Problem]] | None = None,
) -> Pipeline:
    """The grain pipeline of `split` ("train" | "val") for this process.

    `batch_size` is per process (TRAIN.BATCH_SIZE x local devices). Process index/count default to
    jax's. `num_epochs` defaults to endless for "train" and 1 for "val". `store` defaults to the store
    of DATA.EMBEDDING_DIR when DATA.USE_PRECOMPUTED; `index` reuses an `index_dataset` result.
    """
    if split not in SPLITS:
        raise PipelineError(f"split must be one of {SPLITS}, got {split!r}")
    data = cfg.DATA
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    if data.USE_PRECOMPUTED and store is None:
        store = open_store(cfg)
    if not data.USE_PRECOMPUTED:
        store = None
    if data.AUG.ENABLED and store is not None:
        raise PipelineError(
            "DATA.AUG.ENABLED augments frames; trunk features from a store cannot be augmented (a flipped, "
            "warped or recoloured frame has other features): set DATA.USE_PRECOMPUTED False or "
            "DATA.AUG.ENABLED False"
        )
    entries, problems = index if index is not None else index_dataset(cfg, store=store)
    spec = clip_spec(cfg)
    formats = {name: source_named(name).from_config(cfg) for name in sorted({e.source for e in entries})}
    usable = []
    for e in entries:
        if formats[e.source].usable(e, spec):
            usable.append(e)
        else:
            problems = [
                *problems,
                Problem(
                    e.name,
                    f"no {spec.num_frames}-frame clip at skip {spec.frame_skip} shows an object on its first frame",
                ),
            ]
    if data.STRICT:
        check_strict(problems)
    mix, chosen = mix_sources(usable, split, data.SOURCES, data.SOURCE_WEIGHTS, data.VAL_SPLIT, data.VAL_VIDEOS)
    loader = ClipLoader(
        entries=chosen,
        spec=spec,
        seed=cfg.TRAIN.SEED if seed is None else seed,
        split=split,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        mask_size=data.MASK_SIZE or cfg.MODEL.TEACHER.IMAGE_SIZE,
        mix=mix,
        formats=formats,
        store=store,
        image_size=cfg.MODEL.TEACHER.IMAGE_SIZE,
        pixel_mean=tuple(data.PIXEL_MEAN),
        pixel_std=tuple(data.PIXEL_STD),
        augment=AugmentSpec.from_config(data.AUG) if data.AUG.ENABLED and split == "train" else None,
    )
    if loader.steps_per_epoch == 0:
        raise PipelineError(
            f"{split} split has {len(chosen)} usable videos, fewer than one global batch of "
            f"{loader.global_batch} ({batch_size} per process x {process_count} processes)"
            + (f"; {len(problems)} videos had problems, e.g. {problems[0]}" if problems else "")
        )
    epochs = num_epochs if num_epochs is not None else (None if split == "train" else 1)
    workers = data.NUM_WORKERS if num_workers is None else num_workers
    return Pipeline(
        dataset=_grain_dataset(loader, epochs, workers, data.PREFETCH),
        loader=loader,
        problems=problems,
        num_epochs=epochs,
        workers=workers,
        prefetch=data.PREFETCH,
    )
