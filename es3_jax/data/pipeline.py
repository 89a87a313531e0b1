"""The training input pipeline (grain): clips -> embeddings or frames + ground-truth masks -> batches.

Batch format (one dict of numpy arrays per process and step; B = per-process batch, T = DATA.NUM_FRAMES,
O = DATA.MAX_OBJECTS, M = DATA.MASK_SIZE or MODEL.TEACHER.IMAGE_SIZE):

| key | shape, dtype | meaning |
|---|---|---|
| `embeddings` | [B, T, h, w, C], store dtype (bf16) | trunk features from the store (DATA.USE_PRECOMPUTED True) |
| `images` | [B, T, S, S, 3] float32 | frames resized to S = MODEL.TEACHER.IMAGE_SIZE, normalised with DATA.PIXEL_MEAN/STD (USE_PRECOMPUTED False) |
| `masks` | [B, T, O, M, M] bool | ground truth of each object slot on each clip frame, resized like the frames (no crop) |
| `object_valid` | [B, O] bool | slot holds an object (visible on frame 0 of the clip); padded slots are all-False masks |
| `object_ids` | [B, O] int32 | the object's index in its annotation (manual objects first), -1 for padding |
| `video_index` | [B] int32 | index into `Pipeline.videos` (the same list on every process) |
| `frame_indices` | [B, T] int32 | position of each clip frame in the store (or in the video's sorted JPEGs) |
| `frame_numbers` | [B, T] int32 | 24-fps frame number of each clip frame (the JPEG stem) |
| `reversed` | [B] bool | the clip plays backwards |
| `clip_valid` | [B] bool | False only for the padding clips that even out the last validation batch |

Frame 0 of the clip is the conditioning frame: every valid object is visible on it. Masks are at the
model's input resolution because that is where SAM 2 computes its mask losses (the decoder's low-res
logits are upsampled to the image size); DATA.MASK_SIZE trades that for less host memory.

Ordering and sharding: global step k of the run is epoch k // steps_per_epoch. An epoch is a
permutation of the training videos cut to steps_per_epoch x P x B clips (P processes; the remainder,
different videos each epoch, waits for a later epoch), and global batch k is the clip slots
[k·P·B, (k+1)·P·B) of its epoch. Process p loads the p-th block of B, so the processes read disjoint
clips, the same number of batches, and concatenated in process order they form the global batch,
which therefore does not depend on P. Clips are pure functions of (seed, epoch, slot)
(`es3_jax/data/clips.py`).

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
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from es3_jax.data.clips import Clip, ClipSpec, can_sample, eval_clip, sample_epoch_clip
from es3_jax.data.datasets import load_masks
from es3_jax.data.davis import scan_davis
from es3_jax.data.embedding_store import EmbeddingStore
from es3_jax.data.frames import load_frames
from es3_jax.data.sav import ANN_EVERY, scan_sav
from es3_jax.data.videos import Problem, VideoEntry
from es3_jax.errors import Es3Error

SPLITS = ("train", "val")
PROBLEMS_NAMED = 5  # videos a run names at start-up, of each kind of problem


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


@dataclasses.dataclass(frozen=True)
class ClipLoader:
    """Builds process-local batches by global step; picklable (it travels to the grain workers)."""

    entries: tuple[VideoEntry, ...]
    spec: ClipSpec
    seed: int
    split: str
    batch_size: int  # per process
    process_index: int
    process_count: int
    mask_size: int
    store: Any = None  # EmbeddingStore when reading precomputed embeddings
    frames_root: str | None = None  # JPEG folders when reading frames
    image_size: int = 1008
    pixel_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.process_count

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.entries)
        if self.split == "train":
            return n // self.global_batch
        return math.ceil(n / self.global_batch)

    def clip(self, epoch: int, slot: int) -> tuple[Clip, bool]:
        """The clip in `slot` of `epoch`, and whether it is real (False: validation padding)."""
        n = len(self.entries)
        if self.split == "train":
            return sample_epoch_clip(self.entries, self.spec, self.seed, epoch, slot), True
        video = slot % n
        return eval_clip(self.entries[video], self.spec, video=video), slot < n

    def slots(self, step: int) -> tuple[int, list[int]]:
        """(epoch, clip slots of this process) of global step `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        first = within * self.global_batch + self.process_index * self.batch_size
        return epoch, list(range(first, first + self.batch_size))

    def __call__(self, step: int, _element: Any = None) -> dict[str, np.ndarray]:
        epoch, slots = self.slots(step)
        clips = [self.clip(epoch, s) for s in slots]
        examples = [self.load(c, valid) for c, valid in clips]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def load(self, clip: Clip, valid: bool = True) -> dict[str, np.ndarray]:
        """One example (the batch format without the leading B)."""
        entry = self.entries[clip.video]
        o_max = self.spec.max_objects
        positions = clip.positions
        frame_positions = entry.frame_positions[positions]
        out: dict[str, np.ndarray] = {}
        if self.store is not None:
            out["embeddings"] = self.store.read(entry.name, [int(i) for i in frame_positions])
        else:
            folder = Path(entry.frames_dir or Path(self.frames_root) / entry.name)
            paths = [_frame_path(folder, entry.stems[p]) for p in positions]
            out["images"] = load_frames(paths, self.image_size, self.pixel_mean, self.pixel_std)
        t = len(positions)
        masks = np.zeros((t, o_max, self.mask_size, self.mask_size), bool)
        objects = clip.objects[:o_max]
        if len(objects):
            raw = load_masks(entry, positions, objects)  # [T, O', H, W]
            masks[:, : len(objects)] = _resize_masks(raw.reshape(-1, *raw.shape[2:]), self.mask_size).reshape(
                t, len(objects), self.mask_size, self.mask_size
            )
        object_ids = np.full((o_max,), -1, np.int32)
        object_ids[: len(objects)] = [entry.objects[o] for o in objects]
        out.update(
            masks=masks,
            object_valid=object_ids >= 0,
            object_ids=object_ids,
            video_index=np.int32(clip.video),
            frame_indices=frame_positions.astype(np.int32),
            frame_numbers=entry.frame_numbers[positions].astype(np.int32),
            reversed=np.bool_(clip.reversed),
            clip_valid=np.bool_(valid),
        )
        return out


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
) -> tuple[list[VideoEntry], list[Problem]]:
    """Every usable training video of the config (SA-V under DATA.SAV_ROOT, plus the DAVIS "train"
    split when DATA.DAVIS_ROOT is set), and the problems found (see `sav.scan_sav`, `davis.scan_davis`).

    With DATA.USE_PRECOMPUTED the videos and their frame names come from the embedding store.
    """
    data = cfg.DATA
    frame_stems = None
    names: set[str] | None = None
    if store is not None:
        names = set(store.videos())

        def frame_stems(v: str) -> list[str] | None:
            return list(store.metadata(v)["frame_names"]) if v in names else None

    entries: list[VideoEntry] = []
    problems: list[Problem] = []
    if data.DAVIS_ROOT:
        entries, problems = scan_davis(data.DAVIS_ROOT, "train", frame_stems=frame_stems)
        if names is not None:
            names -= {e.name for e in entries} | {p.video for p in problems}
    root = data.SAV_ROOT if data.SAV_ROOT and Path(data.SAV_ROOT).is_dir() else None
    if store is None and root is None:
        if data.DAVIS_ROOT:
            return entries, problems
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
    return sorted(entries + found, key=lambda e: e.name), problems + more


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
    index: tuple[list[VideoEntry], list[Problem]] | None = None,
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
    entries, problems = index if index is not None else index_dataset(cfg, store=store)
    spec = clip_spec(cfg)
    usable = []
    for e in entries:
        if can_sample(e, spec):
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
    train_names, val_names = split_videos([e.name for e in usable], data.VAL_SPLIT, data.VAL_VIDEOS)
    keep = set(train_names if split == "train" else val_names)
    chosen = tuple(e for e in usable if e.name in keep)
    loader = ClipLoader(
        entries=chosen,
        spec=spec,
        seed=cfg.TRAIN.SEED if seed is None else seed,
        split=split,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        mask_size=data.MASK_SIZE or cfg.MODEL.TEACHER.IMAGE_SIZE,
        store=store,
        frames_root=None if store is not None else data.SAV_ROOT,
        image_size=cfg.MODEL.TEACHER.IMAGE_SIZE,
        pixel_mean=tuple(data.PIXEL_MEAN),
        pixel_std=tuple(data.PIXEL_STD),
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
