"""Bank policies: which of an object's tracked frames a tracking step reads, besides its conditioning
frames, and so which ones the bank must keep.

`MemorySchedule` asks its policy once per object and step (`BankPolicy.previous`) and keeps only the
entries the policy may still read (`BankPolicy.keeps`); the bank's shapes never depend on the
policy, so one compiled step serves every policy. `TrackerConfig.MEMORY_POLICY` names the policy
(`POLICIES`); training, the predictor and the ONNX engine build it with `bank_policy`. A new policy is
a `BankPolicy` subclass in its own module and one line in `POLICIES`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence

from es3_jax.config import ConfigError, TrackerConfig


@dataclasses.dataclass
class Entry:
    """A tracked frame of one object, as long as some later step may read it."""

    frame: int
    score: float  # the frame's memory-selection score (0 when the predictor gives none)
    slot: int | None  # spatial slot in the ring; None once only its pointer is needed
    pointer_slot: int


@dataclasses.dataclass(frozen=True)
class PreviousFrames:
    """What one step of one object reads besides its conditioning frames."""

    # The frame read at temporal distance 1, 2, ..., num_maskmem − 1 (None: none); a frame the bank
    # no longer holds is skipped.
    spatial: tuple[int | None, ...]
    pointers: tuple[int, ...]  # the frames whose object pointers are read, at distance 1, 2, ...


class BankPolicy(abc.ABC):
    """Which tracked frames a step reads. `needs_score`: `MemorySchedule.record` must be given each
    tracked frame's score, which a training clip's schedule, built before any frame is tracked,
    has not got."""

    needs_score = False

    def __init__(self, cfg: TrackerConfig):
        self.cfg = cfg

    @abc.abstractmethod
    def previous(
        self, entries: Sequence[Entry], frame: int, reverse: bool, num_frames: int | None, max_pointers: int
    ) -> PreviousFrames:
        """The reads of `frame` for one object whose retained entries are `entries` (tracking order,
        latest last), in a pass of `num_frames` frames (None: a stream) reading at most
        `max_pointers` pointers including its conditioning frames'."""

    def keeps(self, entry: Entry) -> bool:
        """Whether a later step may read `entry` (besides the latest entry, which is always kept)."""
        return True


class RecentFrames(BankPolicy):
    """SAM3 without memory selection: the `num_maskmem − 1` frames just before (after, in reverse) the
    tracked one, and the pointers of the `max_pointers − 1` frames before it that the video has."""

    def previous(
        self, entries: Sequence[Entry], frame: int, reverse: bool, num_frames: int | None, max_pointers: int
    ) -> PreviousFrames:
        sign = -1 if reverse else 1
        spatial = tuple(frame - sign * t_rel for t_rel in range(1, self.cfg.NUM_MASKMEM))
        pointers = []
        for t_diff in range(1, max_pointers):
            prev = frame - sign * t_diff
            if prev < 0 or (num_frames is not None and prev >= num_frames):
                break
            pointers.append(prev)
        return PreviousFrames(spatial, tuple(pointers))


class SelectedFrames(BankPolicy):
    """SAM3's memory selection (upstream `frame_filter`): only frames whose score passes
    `MF_THRESHOLD` are read, the most recent of them first, and always the frame just before."""

    needs_score = True

    def previous(
        self, entries: Sequence[Entry], frame: int, reverse: bool, num_frames: int | None, max_pointers: int
    ) -> PreviousFrames:
        valid = self._selectable(entries, frame, reverse, num_frames, max_pointers)
        spatial = tuple(
            valid[-t_rel] if t_rel <= len(valid) else None for t_rel in range(1, self.cfg.NUM_MASKMEM)
        )
        pointers = tuple(valid[-t_diff] for t_diff in range(1, min(max_pointers, len(valid))))
        return PreviousFrames(spatial, pointers)

    def keeps(self, entry: Entry) -> bool:
        return entry.score > self.cfg.MF_THRESHOLD

    def _selectable(
        self, entries: Sequence[Entry], frame: int, reverse: bool, num_frames: int | None, max_pointers: int
    ) -> list[int]:
        """The readable tracked frames, oldest first."""
        if (frame == 0 and not reverse) or (reverse and frame == num_frames - 1):
            return []
        scored = {e.frame: e.score for e in entries}
        scan = range(frame - 1, 0, -1) if not reverse else range(frame + 1, num_frames)
        valid: list[int] = []
        for i in scan:
            if i not in scored:
                continue
            if scored[i] > self.cfg.MF_THRESHOLD:
                valid.insert(0, i)
            if len(valid) >= max_pointers - 1:
                break
        must = frame + 1 if reverse else frame - 1
        if must not in valid:
            valid.append(must)
        return valid


def _sam3(cfg: TrackerConfig) -> BankPolicy:
    return SelectedFrames(cfg) if cfg.USE_MEMORY_SELECTION else RecentFrames(cfg)


# MEMORY_POLICY -> the policy. "sam3" is upstream's: memory selection as USE_MEMORY_SELECTION says.
POLICIES: dict[str, Callable[[TrackerConfig], BankPolicy]] = {"sam3": _sam3}


def bank_policy(cfg: TrackerConfig, *, scored: bool = True) -> BankPolicy:
    """The policy `cfg.MEMORY_POLICY` names. `scored` False: the caller cannot give frames' scores (a
    training clip), so SAM3's policy reads recent frames, as upstream training does."""
    if cfg.MEMORY_POLICY not in POLICIES:
        raise ConfigError(f"MEMORY_POLICY {cfg.MEMORY_POLICY!r}: not one of {sorted(POLICIES)}")
    if not scored and cfg.MEMORY_POLICY == "sam3":
        return RecentFrames(cfg)
    policy = POLICIES[cfg.MEMORY_POLICY](cfg)
    if policy.needs_score and not scored:
        raise ConfigError(
            f"MEMORY_POLICY {cfg.MEMORY_POLICY!r} reads frames by their scores, which a training clip's "
            "schedule (built before its frames are tracked) has not got"
        )
    return policy
