"""A clip's arrays: `ClipLoader` turns the global step into this process's examples, reading each
item through its format (`DatasetSource.clip` / `load`) and bringing frames and masks to the model's
size (augmented for training)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from es3_jax.data.augment import Augmentation, AugmentSpec, apply_colour, apply_geometry, sample_augmentation
from es3_jax.data.clips import Clip, ClipSpec, augment_rng, clip_rng, load_rng
from es3_jax.data.frames import normalize, resize_frame
from es3_jax.data.mixing import SourceMix
from es3_jax.data.source import ClipArrays, DatasetSource, EmptyClipError, Entry, PipelineError

ITEM_TRIES = 16  # items of a source tried for a slot whose item gives no clip (e.g. no mask kept)


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
    """Builds process-local batches by global step; picklable (it travels to the grain workers).

    `entries` are the items of every source of `mix` laid end to end; training slots draw them by its
    weights. `formats` holds the `DatasetSource` of each entry's `source`."""

    entries: tuple[Entry, ...]
    spec: ClipSpec
    seed: int
    split: str
    batch_size: int  # per process
    process_index: int
    process_count: int
    mask_size: int
    mix: SourceMix
    formats: Mapping[str, DatasetSource]
    store: Any = None  # EmbeddingStore when reading precomputed embeddings
    image_size: int = 1008
    pixel_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    augment: AugmentSpec | None = None  # training clips only

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.process_count

    @property
    def steps_per_epoch(self) -> int:
        if self.split == "train":
            return self.mix.epoch_clips // self.global_batch
        return math.ceil(len(self.entries) / self.global_batch)

    def clip(self, epoch: int, slot: int) -> tuple[Clip, bool]:
        """The clip in `slot` of `epoch`, and whether it is real (False: validation padding)."""
        n = len(self.entries)
        if self.split == "train":
            video = int(self.mix.epoch_order(self.seed, epoch)[slot])
            rng = clip_rng(self.seed, epoch, slot)
        else:
            video, rng = slot % n, None
        entry = self.entries[video]
        clip = self.formats[entry.source].clip(entry, self.spec, video, rng)
        return clip, self.split == "train" or slot < n

    def slots(self, step: int) -> tuple[int, list[int]]:
        """(epoch, clip slots of this process) of global step `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        first = within * self.global_batch + self.process_index * self.batch_size
        return epoch, list(range(first, first + self.batch_size))

    def __call__(self, step: int, _element: Any = None) -> dict[str, np.ndarray]:
        epoch, slots = self.slots(step)
        examples = [self.load(*self.clip(epoch, s), slot=(epoch, s)) for s in slots]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def load(
        self, clip: Clip, valid: bool = True, slot: tuple[int, int] | None = None
    ) -> dict[str, np.ndarray]:
        """One example (the batch format without the leading B). `slot` = (epoch, slot) of a training
        clip seeds its augmentation and what its format draws as it loads (an image's objects and motion)."""
        train = self.split == "train" and slot is not None
        rng = load_rng(self.seed, *slot) if train else load_rng(self.seed, 0, clip.video)
        video, arrays = self._arrays(clip, rng)
        aug = None
        if train and self.augment is not None:
            aug = sample_augmentation(self.augment, augment_rng(self.seed, *slot), self.spec.num_frames)
        out: dict[str, np.ndarray] = {}
        raw = arrays.masks  # [T, O', H, W]
        if arrays.frames is None:
            positions = [int(i) for i in arrays.frame_positions]
            out["embeddings"] = self.store.read(self.entries[video].name, positions)
        else:
            out["images"], raw = self._model_frames(arrays.frames, raw, aug)
        t, count = len(clip.positions), len(arrays.object_ids)
        masks = np.zeros((t, self.spec.max_objects, self.mask_size, self.mask_size), bool)
        if raw is not None and count:
            masks[:, :count] = _resize_masks(raw.reshape(-1, *raw.shape[2:]), self.mask_size).reshape(
                t, count, self.mask_size, self.mask_size
            )
        object_ids = np.full((self.spec.max_objects,), -1, np.int32)
        object_ids[:count] = arrays.object_ids
        out.update(
            masks=masks,
            object_valid=object_ids >= 0,
            object_ids=object_ids,
            video_index=np.int32(video),
            source=np.int32(self.mix.source_of(video)),
            frame_indices=arrays.frame_positions.astype(np.int32),
            frame_numbers=arrays.frame_numbers.astype(np.int32),
            reversed=np.bool_(clip.reversed),
            clip_valid=np.bool_(valid),
        )
        return out

    def _arrays(self, clip: Clip, rng: np.random.Generator) -> tuple[int, ClipArrays]:
        """The item that gives `clip` its arrays, and them: the clip's own, or when its format finds
        nothing to train on in it (an image none of whose masks passes the filters), the next item of
        the same source that has some; stopping a run over one image of a million helps no one."""
        items = self.mix.items_of(self.mix.source_of(clip.video))
        tries = min(len(items), ITEM_TRIES)
        first_error = None
        for k in range(tries):
            video = items.start + (clip.video - items.start + k) % len(items)
            entry = self.entries[video]
            try:
                return video, self.formats[entry.source].load(entry, clip, self.spec, rng, self.store is None)
            except EmptyClipError as e:
                first_error = first_error or e
                logging.warning("%s; its clip uses the next item", e)
        raise PipelineError(f"{first_error}, nor in the {tries - 1} items after it: loosen the filters")

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
