"""How a split draws on its sources: the items of each source, their weights, the held-out validation
items, and the order in which a training epoch visits them (`clips.mixed_epoch_order`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from es3_jax.data.clips import mixed_epoch_order, source_quotas
from es3_jax.data.indexing import split_videos
from es3_jax.data.source import Entry, PipelineError

POOLED = "videos"  # the one source of a split when DATA.SOURCES is empty


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, sizes: tuple[int, ...], weights: tuple[float, ...]) -> np.ndarray:
    return mixed_epoch_order(seed, epoch, sizes, weights)


@dataclasses.dataclass(frozen=True)
class SourceMix:
    """The sources of a split: `sizes[s]` items of source `names[s]` laid end to end, drawn by `weights`."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def epoch_clips(self) -> int:
        """Clip slots of a training epoch (every item once for one source)."""
        if len(self.sizes) == 1:
            return self.sizes[0]
        return int(source_quotas(self.sizes, self.weights).sum())

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The item of each slot of training epoch `epoch` [E] int64."""
        return _epoch_order(seed, epoch, self.sizes, self.weights)

    def source_of(self, item: int) -> int:
        """Index into `names` of item `item`."""
        return int(np.searchsorted(np.cumsum(self.sizes), item, side="right"))

    def items_of(self, source: int) -> range:
        """The items of source `source`."""
        first = int(np.sum(self.sizes[:source]))
        return range(first, first + self.sizes[source])

    def record(self) -> dict[str, float]:
        """The mix, for the run's metrics: `weight/<source>` (normalised) and `epoch_clips/<source>`
        (the clips of a training epoch each source gives)."""
        weights = np.asarray(self.weights, np.float64) / np.sum(self.weights)
        quotas = source_quotas(self.sizes, self.weights) if len(self.sizes) > 1 else self.sizes
        record = {f"weight/{n}": float(w) for n, w in zip(self.names, weights, strict=True)}
        record.update({f"epoch_clips/{n}": float(q) for n, q in zip(self.names, quotas, strict=True)})
        return record


def mix_sources(
    entries: Sequence[Entry],
    split: str,
    sources: Sequence[str] = (),
    weights: Sequence[float] = (),
    val_split: float = 0.0,
    val_videos: int = 0,
) -> tuple[SourceMix, tuple[Entry, ...]]:
    """The mix of `split` ("train" | "val") and its items in mix order: one pool per source of
    `sources` (DATA.SOURCES, weighted by DATA.SOURCE_WEIGHTS), or every entry as one pool when it is
    empty; less (train) or only (val) the held-out items of the first source."""
    if sources:
        names, shares = tuple(sources), tuple(weights)
        pools = [[e for e in entries if e.source == name] for name in names]
        for name, pool in zip(names, pools, strict=True):
            if not pool:
                raise PipelineError(f"DATA.SOURCES: source {name!r} has no usable item")
    else:
        names, shares, pools = (POOLED,), (1.0,), [list(entries)]
    # Validation holds out items of the first source only (mixed in, SA-1B would swamp it).
    _, val_names = split_videos([e.name for e in pools[0]], val_split, val_videos)
    held_out = set(val_names)
    if split == "train":
        pools = [[e for e in pool if e.name not in held_out] for pool in pools]
    else:
        names, shares, pools = names[:1], (1.0,), [[e for e in pools[0] if e.name in held_out]]
    mix = SourceMix(names, tuple(len(pool) for pool in pools), shares)
    return mix, tuple(e for pool in pools for e in pool)
