"""The memory-bank schedule: where each object's memories sit in the fixed-size bank, and which of
them each tracked frame reads.

This is upstream's memory bookkeeping (`_prepare_memory_conditioned_features` and
`select_closest_cond_frames` of `Sam3TrackerBase`) done on the host with plain Python and numpy, so
that the jitted step (`SAM3Tracker.track_step`) sees only fixed-shape index tables. Which tracked
frames a step reads is its `BankPolicy`'s choice (`es3_jax.memory.policy`). The predictor and the
ONNX engine run it as frames are tracked; training runs it once per clip shape to build the clip's
read tables.

Per object the bank holds `layout.cond` conditioning slots (prompted frames, kept for the whole
pass) and a ring of `layout.recent` slots for tracked frames (and `layout.recent_pointers` for
their pointers). A tracked frame stays in the ring only while some later frame can still read it:
its spatial memory while it is among the `num_maskmem − 1` most recent frames the policy keeps, its
pointer while among the last `max_obj_ptrs − 1` of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from es3_jax.config import TrackerConfig
from es3_jax.memory.policy import BankPolicy, Entry

# The fields of `es3_jax.memory.bank.Selection`, which `select` fills.
SELECTION_FIELDS = (
    "frame_slot",
    "frame_tpos",
    "frame_valid",
    "pointer_slot",
    "pointer_rel",
    "pointer_valid",
    "pointer_scale",
    "write_slot",
    "write_pointer_slot",
    "write",
)


@dataclasses.dataclass(frozen=True)
class BankLayout:
    """The bank's sizes per object and how many entries one step reads."""

    cond: int  # conditioning slots (one per prompted frame; spatial and pointer alike)
    recent: int  # spatial slots for tracked frames
    recent_pointers: int  # pointer slots for tracked frames
    cond_reads: int  # conditioning frames a step reads
    spatial_reads: int  # S: memory frames a step reads
    pointer_reads: int  # P: pointers a step reads

    @property
    def slots(self) -> int:
        return self.cond + self.recent

    @property
    def pointer_slots(self) -> int:
        return self.cond + self.recent_pointers

    @staticmethod
    def for_video(cfg: TrackerConfig, most_prompted_frames: int) -> BankLayout:
        """Inference on a video of any length: the sizes do not depend on it, so one compiled step
        serves every video. Conditioning slots come in fours (at least `max_cond_frames_in_attn`)
        so that adding a prompt rarely changes the bank's shape; a step reads as many
        conditioning frames as an object has (at most `max_cond_frames_in_attn`), as upstream's
        attention does: with one prompted frame, no masked entries to attend over."""
        cond = max(cfg.MAX_COND_FRAMES_IN_ATTN, -(-most_prompted_frames // 4) * 4)
        layout = BankLayout(cond, cfg.NUM_MASKMEM, cfg.MAX_OBJ_PTRS_IN_ENCODER, 0, 0, 0)
        return layout.reading(cfg, most_prompted_frames)

    def reading(self, cfg: TrackerConfig, prompted_frames: int) -> BankLayout:
        """This layout with a step's reads sized for objects prompted on up to `prompted_frames` frames."""
        cond_reads = prompted_frames
        if cfg.MAX_COND_FRAMES_IN_ATTN != -1:
            cond_reads = min(cfg.MAX_COND_FRAMES_IN_ATTN, prompted_frames)
        return dataclasses.replace(
            self,
            cond_reads=cond_reads,
            spatial_reads=cond_reads + cfg.NUM_MASKMEM - 1,
            pointer_reads=cond_reads + cfg.MAX_OBJ_PTRS_IN_ENCODER - 1,
        )

    def with_cond(self, cond: int) -> BankLayout:
        """The same layout with `cond` conditioning slots."""
        return dataclasses.replace(self, cond=cond)

    @staticmethod
    def for_clip(cfg: TrackerConfig, num_frames: int) -> BankLayout:
        """A training clip: frame 0 is the one conditioning frame, frames 1..T-1 are tracked; no slot
        or read is sized beyond what T frames can fill."""
        tracked = max(num_frames - 1, 1)
        return BankLayout(
            cond=1,
            cond_reads=1,
            recent=min(cfg.NUM_MASKMEM, tracked),
            recent_pointers=min(cfg.MAX_OBJ_PTRS_IN_ENCODER, tracked),
            spatial_reads=1 + min(cfg.NUM_MASKMEM - 1, tracked),
            pointer_reads=min(num_frames, cfg.MAX_OBJ_PTRS_IN_ENCODER),
        )


def frame_score(presence: np.ndarray, iou: np.ndarray, tracked: np.ndarray) -> float:
    """A tracked frame's memory-selection score from its objects' presence and IoU `[O]`.

    Upstream `cal_mem_score` multiplies a [B, 1] by a [B] tensor before its mean, so the score is
    mean(presence) · mean(IoU) over every tracked object (`tracked` `[O]` bool), not the mean of the
    products; all objects of a frame share it.
    """
    return float(np.mean(presence[tracked]) * np.mean(iou[tracked]))


def select_closest_cond(frame: int, cond: Sequence[int], max_num: int) -> tuple[list[int], list[int]]:
    """Upstream `select_closest_cond_frames` -> (selected, unselected) conditioning frames: all of them
    when at most `max_num` (-1: no limit), else the nearest before `frame`, the nearest at or after
    it, then the others by |Δt|."""
    cond = sorted(cond)
    if max_num == -1 or len(cond) <= max_num:
        return cond, []
    selected = []
    before = [t for t in cond if t < frame]
    after = [t for t in cond if t >= frame]
    if before:
        selected.append(max(before))
    if after:
        selected.append(min(after))
    rest = sorted((t for t in cond if t not in selected), key=lambda t: abs(t - frame))
    selected += rest[: max_num - len(selected)]
    return selected, [t for t in cond if t not in selected]


class MemorySchedule:
    """The bank bookkeeping of one propagation pass over `num_frames` frames (None: a stream of
    frames whose number is not known, tracked forward) and `num_objects` objects.

    Use: `condition(obj, frame)` for every prompted frame of every object, then per tracked frame
    `select(frame, reverse, tracked)` -> the step's read tables, and after the step
    `record(frame, reads, score)`. A stream adds objects as they join (`add_objects`) and frees
    the conditioning slots no later frame can read (`forget_cond`).
    """

    def __init__(
        self,
        cfg: TrackerConfig,
        layout: BankLayout,
        num_frames: int | None,
        num_objects: int,
        *,
        policy: BankPolicy,
    ):
        self.cfg = cfg
        self.layout = layout
        self.num_frames = num_frames
        self.num_objects = num_objects
        self.policy = policy
        self.cond_slots: list[dict[int, int]] = [{} for _ in range(num_objects)]  # frame -> slot
        self.entries: list[list[Entry]] = [[] for _ in range(num_objects)]  # tracking order

    @property
    def max_pointers(self) -> int:
        """Upstream's `min(num_frames, max_obj_ptrs_in_encoder)`."""
        limit = self.cfg.MAX_OBJ_PTRS_IN_ENCODER
        return limit if self.num_frames is None else min(self.num_frames, limit)

    def add_objects(self, count: int) -> None:
        """Objects that join a stream: `count` more, with nothing in the bank yet."""
        self.num_objects += count
        self.cond_slots += [{} for _ in range(count)]
        self.entries += [[] for _ in range(count)]

    # ------------------------------------------------------------------------------------------

    def condition(self, obj: int, frame: int) -> int:
        """Give object `obj`'s prompted `frame` a conditioning slot (the same index for its memory and
        its pointer) and return it; the step's reads grow with the most conditioning frames an object
        has (a stream's prompts arrive one by one)."""
        slots = self.cond_slots[obj]
        if frame not in slots:
            free = sorted(set(range(self.layout.cond)) - set(slots.values()))
            if not free:
                raise ValueError(
                    f"object {obj}: more than {self.layout.cond} prompted frames for this bank layout"
                )
            slots[frame] = free[0]
            if len(slots) > self.layout.cond_reads:
                self.layout = self.layout.reading(self.cfg, len(slots))
        return slots[frame]

    def needs_slot(self, obj: int, frame: int) -> bool:
        """Whether a prompt of object `obj` on `frame` needs a conditioning slot the layout has not
        got free (before `forget_cond`, or a larger layout)."""
        slots = self.cond_slots[obj]
        return frame not in slots and len(slots) >= self.layout.cond

    def forget_cond(self, obj: int, newest: int) -> list[int]:
        """Free object `obj`'s conditioning slots that no frame after `newest` can read, once `newest`
        is conditioning too (a stream, tracked forward, about to take a prompt on its newest frame);
        returns the frames forgotten.

        A later frame reads the `max_cond_frames_in_attn` most recent conditioning frames, and an
        older one only as one of its previous frames: at most `max(num_maskmem, max pointers) − 1`
        frames back.
        """
        t = self.cfg
        if t.MAX_COND_FRAMES_IN_ATTN == -1:
            return []
        horizon = max(t.NUM_MASKMEM, self.max_pointers) - 1
        slots = self.cond_slots[obj]
        kept = sorted({*slots, newest})[-t.MAX_COND_FRAMES_IN_ATTN :]
        gone = [f for f in slots if f not in kept and f <= newest - horizon]
        for f in gone:
            del slots[f]
        return gone

    def select(self, frame: int, reverse: bool, tracked: np.ndarray) -> dict[str, np.ndarray]:
        """The bank entries each tracked object (`tracked` `[O]` bool) reads at `frame`, and where its
        new memory goes: the fields of `Selection` as numpy arrays (see `SELECTION_FIELDS`)."""
        t, lay = self.cfg, self.layout
        o, s_reads, p_reads = self.num_objects, lay.spatial_reads, lay.pointer_reads
        sign = -1 if reverse else 1
        max_ptrs = self.max_pointers
        out = {
            "frame_slot": np.zeros((o, s_reads), np.int32),
            "frame_tpos": np.zeros((o, s_reads), np.int32),
            "frame_valid": np.zeros((o, s_reads), bool),
            "pointer_slot": np.zeros((o, p_reads), np.int32),
            "pointer_rel": np.zeros((o, p_reads), np.float32),
            "pointer_valid": np.zeros((o, p_reads), bool),
            "pointer_scale": np.float32(max(max_ptrs - 1, 1)),
            "write_slot": np.zeros((o,), np.int32),
            "write_pointer_slot": np.zeros((o,), np.int32),
            "write": np.asarray(tracked, bool).copy(),
        }
        for obj in np.flatnonzero(tracked):
            cond = self.cond_slots[obj]
            selected, unselected = select_closest_cond(frame, list(cond), t.MAX_COND_FRAMES_IN_ATTN)
            recent = {e.frame: e for e in self.entries[obj]}

            def lookup(
                i: int, recent=recent, cond=cond, unselected=unselected
            ) -> tuple[int | None, int] | None:
                """(spatial slot or None, pointer slot) of frame i, if the bank still holds it."""
                if i in recent:
                    e = recent[i]
                    return (None if e.slot is None else lay.cond + e.slot), lay.cond + e.pointer_slot
                if i in unselected:
                    return cond[i], cond[i]
                return None

            previous = self.policy.previous(self.entries[obj], frame, reverse, self.num_frames, max_ptrs)
            spatial = [(cond[c], t.NUM_MASKMEM - 1) for c in selected]
            for t_pos in range(1, t.NUM_MASKMEM):
                prev = previous.spatial[t.NUM_MASKMEM - t_pos - 1]
                hit = None if prev is None else lookup(prev)
                if hit is not None and hit[0] is not None:
                    spatial.append((hit[0], t.NUM_MASKMEM - t_pos - 1))
            for k, (slot, tpos) in enumerate(spatial):
                out["frame_slot"][obj, k] = slot
                out["frame_tpos"][obj, k] = tpos
                out["frame_valid"][obj, k] = True

            pointers = [
                (cond[c], (frame - c) * sign) for c in selected if (c >= frame if reverse else c <= frame)
            ]
            for t_diff, prev in enumerate(previous.pointers, start=1):
                hit = lookup(prev)
                if hit is not None:
                    pointers.append((hit[1], t_diff))
            for k, (slot, rel) in enumerate(pointers):
                out["pointer_slot"][obj, k] = slot
                out["pointer_rel"][obj, k] = rel
                out["pointer_valid"][obj, k] = True

            slot, pointer_slot = self._free_slots(self.entries[obj])
            out["write_slot"][obj] = lay.cond + slot
            out["write_pointer_slot"][obj] = lay.cond + pointer_slot
        return out

    def record(self, frame: int, reads: dict[str, np.ndarray], score: float | None = None) -> None:
        """After the step of `frame`: the written objects' memories are in the bank, with the frame's
        memory-selection `score` (None: not known, which a policy that reads scores refuses)."""
        if self.policy.needs_score and score is None:
            raise ValueError(
                f"{type(self.policy).__name__} reads frames by score: record needs the frame's score"
            )
        for obj in np.flatnonzero(reads["write"]):
            entries = self.entries[obj]
            slot = int(reads["write_slot"][obj]) - self.layout.cond
            pointer_slot = int(reads["write_pointer_slot"][obj]) - self.layout.cond
            entries.append(Entry(frame, 0.0 if score is None else score, slot, pointer_slot))
            self._retain(entries)

    # ------------------------------------------------------------------------------------------

    def _ranked(self, entries: list[Entry]) -> list[Entry]:
        """Entries a later step may read (the policy's `keeps`), most recent first."""
        return [e for e in entries[::-1] if self.policy.keeps(e)]

    def _retain(self, entries: list[Entry]) -> None:
        """Drop what no later step can read (entries are in tracking order, latest last).

        The next frame reads at most the latest entry plus the `num_maskmem − 1` most recent frames
        (spatial) and `max pointers − 1` (pointers): by recency, or with memory selection among the
        frames whose score passes the threshold.
        """
        t = self.cfg
        ranked = self._ranked(entries)
        keep_spatial = {id(e) for e in ranked[: t.NUM_MASKMEM - 1]}
        keep_pointer = {id(e) for e in ranked[: t.MAX_OBJ_PTRS_IN_ENCODER - 1]}
        if entries:
            keep_spatial.add(id(entries[-1]))
            keep_pointer.add(id(entries[-1]))
        for e in entries:
            if id(e) not in keep_spatial:
                e.slot = None
        entries[:] = [e for e in entries if id(e) in keep_pointer]

    def _free_slots(self, entries: list[Entry]) -> tuple[int, int]:
        """A spatial and a pointer slot of the ring for the new entry, among those the retained
        entries leave.

        Before this frame's score is known, the latest entry is kept only as an ordinary frame (the
        next step no longer needs it as "the previous frame"), which always frees one slot.
        """
        t = self.cfg
        ranked = self._ranked(entries)
        used = {e.slot for e in ranked[: t.NUM_MASKMEM - 1] if e.slot is not None}
        used_ptr = {e.pointer_slot for e in ranked[: t.MAX_OBJ_PTRS_IN_ENCODER - 1]}
        slot = next(s for s in range(self.layout.recent) if s not in used)
        pointer_slot = next(s for s in range(self.layout.recent_pointers) if s not in used_ptr)
        return slot, pointer_slot
