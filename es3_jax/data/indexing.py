"""What a training run trains on: the items of the config's sources (`DatasetSource.index`), the
problems found on the way and what a run says about them, and the held-out validation names."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from es3_jax.data.datasets import SOURCES
from es3_jax.data.source import Entry, PipelineError, StoreVideos
from es3_jax.data.videos import Problem

if TYPE_CHECKING:
    from es3_jax.config import Config
    from es3_jax.data.embedding_store import EmbeddingStore

PROBLEMS_NAMED = 5  # videos a run names at start-up, of each kind of problem


def index_dataset(
    cfg: Config, *, store: EmbeddingStore | None = None, progress: bool = False
) -> tuple[list[Entry], list[Problem]]:
    """Every usable training item of the config's sources, sorted by name, and the problems found:
    those DATA.SOURCES lists, or (DATA.SOURCES empty) the default sources (SA-V, DAVIS) that have a
    root, as one pool. A source outside the defaults whose root is set must be listed.

    With DATA.USE_PRECOMPUTED (`store` given) the videos and their frame names come from the store.
    """
    listed = tuple(cfg.DATA.SOURCES)
    unknown = [name for name in listed if name not in SOURCES]
    if unknown:
        raise PipelineError(f"DATA.SOURCES {list(listed)}: {unknown} not a format of {sorted(SOURCES)}")
    sources = {name: kind.from_config(cfg) for name, kind in SOURCES.items()}
    for name, source in sources.items():
        if not source.default and name not in listed and source.configured(None):
            raise PipelineError(
                f'{source.root_key} is set but DATA.SOURCES does not list "{name}": give it its share, e.g. '
                f"DATA.SOURCES [sav, {name}] DATA.SOURCE_WEIGHTS [0.7, 0.3]"
            )
    videos = None
    if store is not None:
        videos = StoreVideos(store.videos(), lambda v: store.metadata(v)["frame_names"])
    if listed:
        chosen = [s for name, s in sources.items() if name in listed]
    else:
        defaults = [s for s in sources.values() if s.default]
        chosen = [s for s in defaults if s.configured(videos)]
        if not chosen:
            keys = " or ".join(s.root_key for s in defaults)
            raise PipelineError(f"no training data: DATA.SOURCES is empty and no folder is found at {keys}")
    entries: list[Entry] = []
    problems: list[Problem] = []
    for source in chosen:
        found, more = source.index(videos, progress)
        entries += found
        problems += more
    return sorted(entries, key=lambda e: e.name), problems


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
