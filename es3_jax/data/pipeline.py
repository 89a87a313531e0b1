"""The training input pipeline (grain): clips -> embeddings or frames + ground-truth masks -> batches.

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

Frame 0 of the clip is the conditioning frame: every valid object is visible on it. An SA-1B image
(`sa1b.py`) becomes a clip by `pseudo_video.py`; its `frame_indices` and `frame_numbers` are 0..T-1 and
its `object_ids` index the image's annotations. Masks are at the
model's input resolution because that is where SAM 2 computes its mask losses (the decoder's low-res
logits are upsampled to the image size); DATA.MASK_SIZE trades that for less host memory.

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
import functools
import hashlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from es3_jax.data.augment import Augmentation, AugmentSpec, apply_colour, apply_geometry, sample_augmentation
from es3_jax.data.clips import (
    Clip,
    ClipSpec,
    augment_rng,
    can_sample,
    clip_rng,
    eval_clip,
    image_clip,
    image_rng,
    mixed_epoch_order,
    sample_clip,
    source_quotas,
)
from es3_jax.data.datasets import load_masks
from es3_jax.data.davis import scan_davis
from es3_jax.data.embedding_store import EmbeddingStore
from es3_jax.data.frames import normalize, read_frame, resize_frame
from es3_jax.data.pseudo_video import MotionSpec, make_clip, sample_motion
from es3_jax.data.sa1b import AnnotationFilter, Sa1bImage, load_image, read_sa1b_json, scan_sa1b
from es3_jax.data.sav import ANN_EVERY, scan_sav
from es3_jax.data.videos import Problem, VideoEntry
from es3_jax.errors import Es3Error

SPLITS = ("train", "val")
PROBLEMS_NAMED = 5  # videos a run names at start-up, of each kind of problem
IMAGE_TRIES = 16  # SA-1B images tried for a slot whose image has no mask the filters keep


class PipelineError(Es3Error):
    """The data pipeline cannot be built from this config or data; the message names the key or path."""


def problem_report(
    problems: Sequence[Problem], named: int = PROBLEMS_NAMED
) -> tuple[list[str], dict[str, float]]:
    """What a run says at start-up about the videos its index left out and those it kept without some
    objects: log lines (the counts, then the first `named` of each kind with the reason) and a metrics
    record (`skipped_videos`, `videos_with_objects_dropped`, and `skipped/<video>` /
    `objects_dropped/<video>` = 1 for the videos named). Both are empty when there is no problem."""
    if not problems:
        return [], {}
    skipped = [p for p in problems if p.skipped]
    kept = [p for p in problems if not p.skipped]
    lines = [
        f"data: videos skipped: {len(skipped)}, kept without some objects: {len(kept)}"
        + (" (DATA.STRICT True makes a skipped video an error)" if skipped else "")
    ]
    record = {"skipped_videos": float(len(skipped)), "videos_with_objects_dropped": float(len(kept))}
    for found, what, key in ((skipped, "skipped", "skipped"), (kept, "kept", "objects_dropped")):
        lines += [f"data: {what} {p}" for p in found[:named]]
        if len(found) > named:
            lines.append(f"data: ... and {len(found) - named} more {what}")
        record.update({f"{key}/{p.video}": 1.0 for p in found[:named]})
    return lines, record


def check_strict(problems: Sequence[Problem]) -> None:
    """DATA.STRICT: PipelineError naming the videos the index left out, if any."""
    skipped = [p for p in problems if p.skipped]
    if skipped:
        shown = "; ".join(str(p) for p in skipped[:PROBLEMS_NAMED])
        more = f"; and {len(skipped) - PROBLEMS_NAMED} more" if len(skipped) > PROBLEMS_NAMED else ""
        raise PipelineError(
            f"DATA.STRICT: videos the index left out ({len(skipped)}): {shown}{more} (DATA.STRICT False "
            "trains without them)"
        )


def split_videos(names: Sequence[str], val_split: float, val_videos: int = 0) -> tuple[list[str], list[str]]:
    """(train, val) names: the held-out videos are those whose name hashes lowest, so the split is
    deterministic and a video keeps its side when others are added or removed nearby.

    `val_videos` > 0 holds out that many; otherwise round(val_split x n), at least one when val_split > 0
    and there are two or more videos.
    """
    names = sorted(names)
    n = len(names)
    if val_videos > 0:
        k = val_videos
    elif val_split > 0:
        k = max(1, round(val_split * n)) if n > 1 else 0
    else:
        k = 0
    if k >= n and n > 0:
        raise PipelineError(f"DATA.VAL_VIDEOS/VAL_SPLIT hold out {k} of {n} videos, leaving none to train on")
    ranked = sorted(names, key=lambda s: hashlib.sha1(s.encode()).hexdigest())
    val = set(ranked[:k])
    return [s for s in names if s not in val], [s for s in names if s in val]


def _frame_path(folder: Path, stem: str) -> Path:
    for ext in (".jpg", ".jpeg", ".JPG", ".JPEG", ".png"):
        p = folder / f"{stem}{ext}"
        if p.exists():
            return p
    raise PipelineError(f"frame {stem} not found in {folder}")


def _resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """[N, H, W] uint8 0/1 -> [N, size, size] bool, bilinear (antialiased when shrinking) then >= 0.5,
    the resampling the frames get, so masks stay aligned with them."""
    if masks.shape[1:] == (size, size):
        return masks.astype(bool)
    out = np.empty((len(masks), size, size), bool)
    for i, m in enumerate(masks):
        img = Image.fromarray(m * np.uint8(255)).resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(img) >= 128
    return out


def source_name(entry: VideoEntry | Sa1bImage) -> str:
    """"sav", "davis" or "sa1b"."""
    return "sa1b" if isinstance(entry, Sa1bImage) else entry.source


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, sizes: tuple[int, ...], weights: tuple[float, ...]) -> np.ndarray:
    return mixed_epoch_order(seed, epoch, sizes, weights)


@dataclasses.dataclass(frozen=True)
class ClipLoader:
    """Builds process-local batches by global step; picklable (it travels to the grain workers).

    `entries` are the items of every source laid end to end (`source_sizes` of each, in the order of
    `sources`); training slots draw them by `source_weights` (`clips.mixed_epoch_order`)."""

    entries: tuple[VideoEntry | Sa1bImage, ...]
    spec: ClipSpec
    seed: int
    split: str
    batch_size: int  # per process
    process_index: int
    process_count: int
    mask_size: int
    sources: tuple[str, ...] = ("videos",)
    source_sizes: tuple[int, ...] = ()
    source_weights: tuple[float, ...] = (1.0,)
    store: Any = None  # EmbeddingStore when reading precomputed embeddings
    frames_root: str | None = None  # JPEG folders when reading frames
    image_size: int = 1008
    pixel_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    augment: AugmentSpec | None = None  # training clips only
    motion: MotionSpec = dataclasses.field(default_factory=MotionSpec)
    sa1b_filter: AnnotationFilter = dataclasses.field(default_factory=AnnotationFilter)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.process_count

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.source_sizes or (len(self.entries),)

    @property
    def epoch_clips(self) -> int:
        """Clip slots of a training epoch (every item once for one source)."""
        if len(self.sizes) == 1:
            return self.sizes[0]
        return int(source_quotas(self.sizes, self.source_weights).sum())

    @property
    def steps_per_epoch(self) -> int:
        if self.split == "train":
            return self.epoch_clips // self.global_batch
        return math.ceil(len(self.entries) / self.global_batch)

    def source_of(self, item: int) -> int:
        """Index into `sources` of entry `item`."""
        return int(np.searchsorted(np.cumsum(self.sizes), item, side="right"))

    def clip(self, epoch: int, slot: int) -> tuple[Clip, bool]:
        """The clip in `slot` of `epoch`, and whether it is real (False: validation padding)."""
        n = len(self.entries)
        if self.split == "train":
            video = int(_epoch_order(self.seed, epoch, self.sizes, tuple(self.source_weights))[slot])
        else:
            video = slot % n
        entry = self.entries[video]
        if isinstance(entry, Sa1bImage):
            return image_clip(self.spec, video), self.split == "train" or slot < n
        if self.split == "train":
            return sample_clip(entry, self.spec, clip_rng(self.seed, epoch, slot), video=video), True
        return eval_clip(entry, self.spec, video=video), slot < n

    def slots(self, step: int) -> tuple[int, list[int]]:
        """(epoch, clip slots of this process) of global step `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        first = within * self.global_batch + self.process_index * self.batch_size
        return epoch, list(range(first, first + self.batch_size))

    def __call__(self, step: int, _element: Any = None) -> dict[str, np.ndarray]:
        epoch, slots = self.slots(step)
        examples = [self.load(*self.clip(epoch, s), slot=(epoch, s)) for s in slots]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def load(self, clip: Clip, valid: bool = True, slot: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """One example (the batch format without the leading B). `slot` = (epoch, slot) of a training
        clip seeds its augmentation and, for an image, its objects and motion."""
        video = clip.video
        entry = self.entries[video]
        train = self.split == "train" and slot is not None
        if isinstance(entry, Sa1bImage):
            rng = image_rng(self.seed, *slot) if train else image_rng(self.seed, 0, video)
            video, frames, raw, objects = self._image_clip(video, rng)
            frame_positions = frame_numbers = np.arange(self.spec.num_frames)
        else:
            objects = clip.objects[: self.spec.max_objects]
            frame_positions = entry.frame_positions[clip.positions]
            frame_numbers = entry.frame_numbers[clip.positions]
            frames = None if self.store is not None else self._video_frames(entry, clip.positions)
            raw = load_masks(entry, clip.positions, objects) if len(objects) else None  # [T, O', H, W]
        aug = None
        if train and self.augment is not None:
            aug = sample_augmentation(self.augment, augment_rng(self.seed, *slot), self.spec.num_frames)
        out: dict[str, np.ndarray] = {}
        if frames is None:
            out["embeddings"] = self.store.read(entry.name, [int(i) for i in frame_positions])
        else:
            out["images"], raw = self._model_frames(frames, raw, aug)
        t = len(clip.positions)
        masks = np.zeros((t, self.spec.max_objects, self.mask_size, self.mask_size), bool)
        if raw is not None and len(objects):
            masks[:, : len(objects)] = _resize_masks(raw.reshape(-1, *raw.shape[2:]), self.mask_size).reshape(
                t, len(objects), self.mask_size, self.mask_size
            )
        object_ids = np.full((self.spec.max_objects,), -1, np.int32)
        if isinstance(entry, Sa1bImage):
            object_ids[: len(objects)] = objects
        else:
            object_ids[: len(objects)] = [entry.objects[o] for o in objects]
        out.update(
            masks=masks,
            object_valid=object_ids >= 0,
            object_ids=object_ids,
            video_index=np.int32(video),
            source=np.int32(self.source_of(video)),
            frame_indices=frame_positions.astype(np.int32),
            frame_numbers=frame_numbers.astype(np.int32),
            reversed=np.bool_(clip.reversed),
            clip_valid=np.bool_(valid),
        )
        return out

    def _video_frames(self, entry: VideoEntry, positions: np.ndarray) -> list[np.ndarray]:
        """The clip's JPEGs at their own size, `[H, W, 3]` uint8 each."""
        folder = Path(entry.frames_dir or Path(self.frames_root) / entry.name)
        return [read_frame(_frame_path(folder, entry.stems[p])) for p in positions]

    def _image_clip(
        self, entry_index: int, rng: np.random.Generator
    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """An SA-1B image as a pseudo-video: the entry used, frames `[T, H, W, 3]`, masks
        `[T, O', H, W]`, and the annotation indices of its O' objects (those the filters keep, up to
        DATA.MAX_OBJECTS)."""
        # An image none of whose masks passes the filters gives its slot to the next image of the
        # source (said in the log): stopping a run over one image of a million helps no one.
        first = int(np.cumsum((0, *self.sizes))[self.source_of(entry_index)])
        count = self.sizes[self.source_of(entry_index)]
        for k in range(min(count, IMAGE_TRIES)):
            used = first + (entry_index - first + k) % count
            entry = self.entries[used]
            annotation = read_sa1b_json(entry.json_path)
            kept = annotation.select(self.sa1b_filter)
            if len(kept):
                break
            logging.warning("%s: no mask passes the DATA.SA1B filters; its clip uses the next image", entry.json_path)
        else:
            raise PipelineError(
                f"{self.entries[entry_index].json_path} and the {min(count, IMAGE_TRIES) - 1} images after it: "
                f"no mask passes the DATA.SA1B filters ({self.sa1b_filter}); loosen them"
            )
        take = min(len(kept), self.spec.max_objects)
        objects = np.sort(rng.choice(kept, size=take, replace=False))
        image = load_image(entry, annotation)
        motion = sample_motion(self.motion, rng, self.spec.num_frames, *image.shape[:2])
        frames, masks = make_clip(image, annotation.masks(objects), motion)
        return used, frames, masks, objects

    def _model_frames(
        self, frames: Sequence[np.ndarray], masks: np.ndarray | None, aug: Augmentation | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Source frames (and their masks `[T, O', H, W]`) -> normalised model frames `[T, S, S, 3]`
        float32, augmented by `aug` when given, and the masks after the same geometry."""
        if aug is not None:
            shapes = {f.shape for f in frames}
            if len(shapes) > 1:
                raise PipelineError(f"a clip's frames differ in size ({sorted(shapes)}): cannot augment it")
            stacked = np.stack(frames)
            if masks is None:
                masks = np.zeros((len(stacked), 0, *stacked.shape[1:3]), np.uint8)
            stacked, masks = apply_geometry(aug, stacked, masks)
            frames = list(stacked)
        resized = np.stack([resize_frame(f, self.image_size) for f in frames])
        pixels = apply_colour(aug, resized) if aug is not None else resized
        return normalize(pixels, self.pixel_mean, self.pixel_std), masks


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
        return self.loader.sources

    def mixing(self) -> dict[str, float]:
        """The configured mix, for the run's metrics: `weight/<source>` (normalised) and
        `epoch_clips/<source>` (the clips of a training epoch each source gives)."""
        loader = self.loader
        weights = np.asarray(loader.source_weights, np.float64) / np.sum(loader.source_weights)
        quotas = source_quotas(loader.sizes, loader.source_weights) if len(loader.sizes) > 1 else loader.sizes
        record = {f"weight/{n}": float(w) for n, w in zip(loader.sources, weights, strict=True)}
        record.update({f"epoch_clips/{n}": float(q) for n, q in zip(loader.sources, quotas, strict=True)})
        return record

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


def index_dataset(
    cfg, *, store: Any = None, progress: bool = False
) -> tuple[list[VideoEntry | Sa1bImage], list[Problem]]:
    """Every usable training item of the config's sources, and the problems found (see
    `sav.scan_sav`, `davis.scan_davis`, `sa1b.scan_sa1b`): the SA-V videos under DATA.SAV_ROOT and the
    DAVIS "train" split when DATA.DAVIS_ROOT is set (DATA.SOURCES empty), or the sources DATA.SOURCES
    lists, SA-1B images (DATA.SA1B.ROOT) among them.

    With DATA.USE_PRECOMPUTED the videos and their frame names come from the embedding store.
    """
    data = cfg.DATA
    explicit = bool(data.SOURCES)
    wanted = set(data.SOURCES) if explicit else {"sav", "davis"}
    if data.SA1B.ROOT and "sa1b" not in wanted:
        raise PipelineError(
            'DATA.SA1B.ROOT is set but DATA.SOURCES does not list "sa1b": give SA-1B its share, e.g. '
            "DATA.SOURCES [sav, sa1b] DATA.SOURCE_WEIGHTS [0.7, 0.3]"
        )
    entries: list[VideoEntry | Sa1bImage] = []
    problems: list[Problem] = []
    if "sa1b" in wanted:
        if store is not None:
            raise PipelineError(
                "DATA.SOURCES lists sa1b, whose pseudo-videos are frames warped as they load: they have "
                "no stored trunk features; train on frames (DATA.USE_PRECOMPUTED False)"
            )
        if not data.SA1B.ROOT:
            raise PipelineError("DATA.SOURCES lists sa1b but DATA.SA1B.ROOT is empty")
        entries, problems = scan_sa1b(data.SA1B.ROOT)
    frame_stems = None
    names: set[str] | None = None
    if store is not None:
        names = set(store.videos())

        def frame_stems(v: str) -> list[str] | None:
            return list(store.metadata(v)["frame_names"]) if v in names else None

    videos: list[VideoEntry] = []
    if "davis" in wanted and data.DAVIS_ROOT:
        videos, more = scan_davis(data.DAVIS_ROOT, "train", frame_stems=frame_stems)
        problems += more
        if names is not None:
            names -= {e.name for e in videos} | {p.video for p in more}
    elif explicit and "davis" in wanted:
        raise PipelineError("DATA.SOURCES lists davis but DATA.DAVIS_ROOT is empty")
    if "sav" not in wanted:
        return sorted(videos, key=lambda e: e.name) + entries, problems
    root = data.SAV_ROOT if data.SAV_ROOT and Path(data.SAV_ROOT).is_dir() else None
    if store is None and root is None:
        if data.DAVIS_ROOT and not explicit:
            return videos, problems
        raise PipelineError(f"DATA.SAV_ROOT: frames folder not found: {data.SAV_ROOT!r}")
    if data.FRAME_SKIP % ANN_EVERY:
        raise PipelineError(
            f"DATA.FRAME_SKIP ({data.FRAME_SKIP}) must be a multiple of {ANN_EVERY}: SA-V masks exist only "
            f"on every {ANN_EVERY}th 24-fps frame"
        )
    found, more = scan_sav(
        root,
        data.ANNOTATION_DIR or root,
        annotation=data.ANNOTATION,
        videos=None if names is None else sorted(names),
        frame_stems=frame_stems,
        progress=progress,
    )
    return sorted(videos + found, key=lambda e: e.name) + entries, problems + more


def open_store(cfg):
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


def clip_spec(cfg) -> ClipSpec:
    d = cfg.DATA
    return ClipSpec(
        num_frames=d.NUM_FRAMES,
        frame_skip=d.FRAME_SKIP,
        max_objects=d.MAX_OBJECTS,
        reverse_prob=d.REVERSE_PROB,
    )


def build_pipeline(
    cfg,
    *,
    split: str = "train",
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int | None = None,
    num_epochs: int | None = None,
    seed: int | None = None,
    store: Any = None,
    index: tuple[list[VideoEntry | Sa1bImage], list[Problem]] | None = None,
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
    usable = []
    for e in entries:
        if isinstance(e, Sa1bImage) or can_sample(e, spec):
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
    if data.SOURCES:
        sources, weights = tuple(data.SOURCES), tuple(data.SOURCE_WEIGHTS)
        pools = [[e for e in usable if source_name(e) == name] for name in sources]
        for name, pool in zip(sources, pools, strict=True):
            if not pool:
                raise PipelineError(f"DATA.SOURCES: source {name!r} has no usable item")
    else:
        sources, weights, pools = ("videos",), (1.0,), [usable]
    # Validation holds out items of the first source only (mixed in, SA-1B would swamp it).
    _, val_names = split_videos([e.name for e in pools[0]], data.VAL_SPLIT, data.VAL_VIDEOS)
    held_out = set(val_names)
    if split == "train":
        pools = [[e for e in pool if e.name not in held_out] for pool in pools]
    else:
        sources, weights, pools = sources[:1], (1.0,), [[e for e in pools[0] if e.name in held_out]]
    chosen = tuple(e for pool in pools for e in pool)
    loader = ClipLoader(
        entries=chosen,
        spec=spec,
        seed=cfg.TRAIN.SEED if seed is None else seed,
        split=split,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        mask_size=data.MASK_SIZE or cfg.MODEL.TEACHER.IMAGE_SIZE,
        sources=sources,
        source_sizes=tuple(len(pool) for pool in pools),
        source_weights=weights,
        store=store,
        frames_root=None if store is not None else data.SAV_ROOT,
        image_size=cfg.MODEL.TEACHER.IMAGE_SIZE,
        pixel_mean=tuple(data.PIXEL_MEAN),
        pixel_std=tuple(data.PIXEL_STD),
        augment=AugmentSpec.from_config(data.AUG) if data.AUG.ENABLED and split == "train" else None,
        motion=MotionSpec.from_config(data.SA1B),
        sa1b_filter=AnnotationFilter(
            min_area=data.SA1B.MIN_AREA,
            max_area=data.SA1B.MAX_AREA,
            min_predicted_iou=data.SA1B.MIN_PREDICTED_IOU,
            min_stability_score=data.SA1B.MIN_STABILITY_SCORE,
        ),
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
