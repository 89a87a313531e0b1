"""The memory-bank schedule (`es3_jax.memory.schedule`), against upstream's selection rules written
out frame by frame: which memories a tracked frame reads, in which temporal slot, and that the ring
of recent slots never overwrites one a later frame still reads."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from es3_jax.config import TrackerConfig
from es3_jax.memory.policy import RecentFrames, SelectedFrames
from es3_jax.memory.schedule import SELECTION_FIELDS, BankLayout, MemorySchedule, select_closest_cond

REPO = Path(__file__).resolve().parents[2]
CFG = TrackerConfig()  # num_maskmem 7, 16 pointers, 4 conditioning frames in attention


class Bank:
    """What each slot holds, as the step would write it: `select`'s write slots, then `record`."""

    def __init__(self, schedule: MemorySchedule):
        self.schedule = schedule
        self.frames: dict[tuple[int, int], int] = {}  # (object, slot) -> frame
        self.pointers: dict[tuple[int, int], int] = {}

    def prompt(self, obj: int, frame: int) -> None:
        slot = self.schedule.condition(obj, frame)
        self.frames[obj, slot] = self.pointers[obj, slot] = frame

    def track(self, frame: int, tracked: np.ndarray, reverse: bool = False, score: float | None = None):
        """-> per object: ({frame read: temporal slot}, {pointer frame read: relative position})."""
        reads = self.schedule.select(frame, reverse, tracked)
        seen = []
        for obj in range(len(tracked)):
            frames = np.stack([reads["frame_slot"][obj], reads["frame_tpos"][obj]], axis=1)
            pointers = np.stack([reads["pointer_slot"][obj], reads["pointer_rel"][obj]], axis=1)
            spatial = {self.frames[obj, int(s)]: int(t) for s, t in frames[reads["frame_valid"][obj]]}
            ptrs = {self.pointers[obj, int(s)]: float(r) for s, r in pointers[reads["pointer_valid"][obj]]}
            seen.append((spatial, ptrs))
        for obj in np.flatnonzero(reads["write"]):
            self.frames[obj, int(reads["write_slot"][obj])] = frame
            self.pointers[obj, int(reads["write_pointer_slot"][obj])] = frame
        self.schedule.record(frame, reads, score)
        return reads, seen


def _upstream_reads(frame: int, cond: int, num_frames: int, cfg: TrackerConfig = CFG):
    """Upstream's reads of a forward frame with one conditioning frame, memory selection off: the
    conditioning frame at the last temporal slot, the previous num_maskmem − 1 frames at t − 1; its
    pointer at distance `frame − cond`, the previous frames' at their distance."""
    m = cfg.NUM_MASKMEM
    spatial = {cond: m - 1, **{frame - d: d - 1 for d in range(1, m) if frame - d > cond}}
    max_ptrs = min(num_frames, cfg.MAX_OBJ_PTRS_IN_ENCODER)
    pointers = {
        cond: float(frame - cond),
        **{frame - d: float(d) for d in range(1, max_ptrs) if frame - d > cond},
    }
    return spatial, pointers


def test_a_clip_reads_what_upstream_reads_and_fits_its_frames():
    """A 20-frame training clip: the ring recycles its 7 slots and every read still finds its frame."""
    num_frames, objects = 20, 3
    layout = BankLayout.for_clip(CFG, num_frames)
    assert (layout.slots, layout.pointer_slots, layout.spatial_reads, layout.pointer_reads) == (8, 17, 7, 16)
    bank = Bank(MemorySchedule(CFG, layout, num_frames, objects, policy=RecentFrames(CFG)))
    for obj in range(objects):
        bank.prompt(obj, 0)
    for frame in range(1, num_frames):
        reads, seen = bank.track(frame, np.ones(objects, bool))
        assert set(reads) == set(SELECTION_FIELDS)
        assert reads["pointer_scale"] == min(num_frames, 16) - 1
        for spatial, pointers in seen:
            assert (spatial, pointers) == _upstream_reads(frame, 0, num_frames), frame


def test_a_short_clip_sizes_nothing_beyond_its_frames():
    layout = BankLayout.for_clip(CFG, 3)
    assert (layout.slots, layout.pointer_slots, layout.spatial_reads, layout.pointer_reads) == (3, 3, 3, 3)


def test_a_long_video_keeps_the_bank_bounded_and_reads_right():
    """1000 frames from a prompt on frame 0: the same fixed layout, and upstream's reads on every frame."""
    layout = BankLayout.for_video(CFG, 1)
    assert (layout.slots, layout.pointer_slots) == (4 + 7, 4 + 16)
    bank = Bank(MemorySchedule(CFG, layout, 1000, 1, policy=RecentFrames(CFG)))
    bank.prompt(0, 0)
    for frame in range(1, 1000):
        _, [(spatial, pointers)] = bank.track(frame, np.ones(1, bool))
        assert (spatial, pointers) == _upstream_reads(frame, 0, 1000), frame
    assert len(bank.schedule.entries[0]) == 15  # the pointers a next frame can read, no more


def test_reverse_reads_the_frames_after():
    bank = Bank(MemorySchedule(CFG, BankLayout.for_video(CFG, 1), 30, 1, policy=RecentFrames(CFG)))
    bank.prompt(0, 29)
    for frame in range(28, -1, -1):
        _, [(spatial, pointers)] = bank.track(frame, np.ones(1, bool), reverse=True)
        want_spatial, want_pointers = _upstream_reads(29 - frame, 0, 30)
        assert spatial == {29 - f: t for f, t in want_spatial.items()}
        assert pointers == {29 - f: r for f, r in want_pointers.items()}


def _frame_filter(frame: int, scores: dict[int, float], cfg: TrackerConfig = CFG) -> list[int]:
    """Upstream's memory selection (`frame_filter`), forward: the most recent earlier frames whose score
    passes MF_THRESHOLD (at most max_obj_ptrs − 1), oldest first, and the frame just before always."""
    valid: list[int] = []
    for i in range(frame - 1, 0, -1):
        if scores[i] > cfg.MF_THRESHOLD:
            valid.insert(0, i)
        if len(valid) >= cfg.MAX_OBJ_PTRS_IN_ENCODER - 1:
            break
    if frame - 1 not in valid:
        valid.append(frame - 1)
    return valid


def test_memory_selection_reads_only_frames_that_pass_the_threshold():
    """Upstream reads, with memory selection: spatial memories of the last num_maskmem − 1 selected
    frames (temporal slot = rank from the end), pointers of all selected frames but the oldest."""
    bank = Bank(MemorySchedule(CFG, BankLayout.for_video(CFG, 1), 60, 1, policy=SelectedFrames(CFG)))
    bank.prompt(0, 0)
    scores = {f: 0.0 if f % 3 == 0 else 0.9 for f in range(1, 60)}
    for frame in range(1, 60):
        _, [(spatial, pointers)] = bank.track(frame, np.ones(1, bool), score=scores[frame])
        valid = _frame_filter(frame, scores)
        m = CFG.NUM_MASKMEM
        want_spatial = {0: m - 1, **{valid[-t]: t - 1 for t in range(1, m) if t <= len(valid) and valid[-t]}}
        want_pointers = {0: float(frame), **{valid[-t]: float(t) for t in range(1, len(valid)) if valid[-t]}}
        assert (spatial, pointers) == (want_spatial, want_pointers), frame


def test_objects_joining_later_and_many_conditioning_frames():
    """Object 1 joins on frame 5; object 0 is prompted on 6 frames, more than the 4 a step attends
    to: the nearest before and after, then by distance, are read as conditioning frames."""
    bank = Bank(MemorySchedule(CFG, BankLayout.for_video(CFG, 6), 40, 2, policy=RecentFrames(CFG)))
    prompted = [0, 10, 20, 30, 35, 39]
    for f in prompted:
        bank.prompt(0, f)
    bank.prompt(1, 5)
    assert bank.schedule.layout.cond == 8
    selected, unselected = select_closest_cond(22, prompted, CFG.MAX_COND_FRAMES_IN_ATTN)
    assert selected == [20, 30, 10, 35] and unselected == [0, 39]
    for frame in range(1, 23):
        tracked = np.array([frame not in prompted, frame > 5])
        reads, seen = bank.track(frame, tracked)
        assert not reads["frame_valid"][1].any() if frame <= 5 else reads["frame_valid"][1][0]
    spatial, _ = seen[0]
    conds = {f for f, t in spatial.items() if t == CFG.NUM_MASKMEM - 1}
    assert conds == {20, 30, 10, 35}


def test_more_prompts_than_the_layout_holds_is_an_error():
    schedule = MemorySchedule(CFG, BankLayout.for_video(CFG, 1), 10, 1, policy=RecentFrames(CFG))
    for f in range(4):
        schedule.condition(0, f)
    with pytest.raises(ValueError, match="more than 4 prompted frames"):
        schedule.condition(0, 9)


def test_memory_selection_needs_a_score():
    schedule = MemorySchedule(CFG, BankLayout.for_video(CFG, 1), 10, 1, policy=SelectedFrames(CFG))
    schedule.condition(0, 0)
    reads = schedule.select(1, False, np.ones(1, bool))
    with pytest.raises(ValueError, match="score"):
        schedule.record(1, reads)


def test_the_schedule_runs_without_jax():
    code = "import sys, es3_jax.memory.schedule; print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_config_without_memory_selection_needs_no_score():
    cfg = dataclasses.replace(CFG, USE_MEMORY_SELECTION=False)
    schedule = MemorySchedule(cfg, BankLayout.for_video(cfg, 1), 5, 1, policy=RecentFrames(cfg))
    schedule.condition(0, 0)
    schedule.record(1, schedule.select(1, False, np.ones(1, bool)))
    assert [e.frame for e in schedule.entries[0]] == [1]


def test_a_stream_forgets_only_conditioning_frames_no_later_frame_reads():
    """A stream (no known length) prompting its object every 10 frames over 300: with the slots no
    later frame can read freed before each prompt, the bank keeps 4 conditioning slots, and every
    frame reads exactly what it reads when nothing is forgotten."""
    layout = BankLayout.for_video(CFG, 1)
    stream = Bank(MemorySchedule(CFG, layout, None, 1, policy=RecentFrames(CFG)))
    kept = Bank(MemorySchedule(CFG, layout.with_cond(32), None, 1, policy=RecentFrames(CFG)))
    forgotten = []
    for frame in range(300):
        if frame % 10 == 0:
            forgotten += stream.schedule.forget_cond(0, frame)
            stream.prompt(0, frame)
            kept.prompt(0, frame)
            continue
        tracked = np.ones(1, bool)
        assert stream.track(frame, tracked)[1] == kept.track(frame, tracked)[1], frame
    assert len(stream.schedule.cond_slots[0]) == 4
    assert forgotten == list(range(0, 260, 10))
    # One prompted frame: a step reads it and the 6 previous frames, as upstream's does; the reads
    # grew with the prompts, to the 4 conditioning frames attention takes.
    assert (layout.spatial_reads, layout.pointer_reads) == (7, 16)
    assert (stream.schedule.layout.spatial_reads, stream.schedule.layout.pointer_reads) == (10, 19)


def test_objects_join_a_stream():
    schedule = MemorySchedule(CFG, BankLayout.for_video(CFG, 1), None, 1, policy=SelectedFrames(CFG))
    schedule.condition(0, 0)
    schedule.record(1, schedule.select(1, False, np.ones(1, bool)), 0.5)
    schedule.add_objects(2)
    schedule.condition(2, 2)
    reads = schedule.select(2, False, np.array([True, False, False]))
    assert reads["write"].tolist() == [True, False, False]
    assert reads["pointer_scale"] == CFG.MAX_OBJ_PTRS_IN_ENCODER - 1
    assert schedule.cond_slots == [{0: 0}, {}, {2: 0}]
