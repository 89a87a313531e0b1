"""Bank policies (`es3_jax.memory.policy`): chosen by `MODEL.TEACHER.MEMORY_POLICY`, a new one is one
class and one registry entry, and the schedule reads only what the policy returns."""

import dataclasses

import numpy as np
import pytest

from es3_jax.config import ConfigError, TrackerConfig
from es3_jax.memory.policy import (
    POLICIES,
    BankPolicy,
    PreviousFrames,
    RecentFrames,
    SelectedFrames,
    bank_policy,
)
from es3_jax.memory.schedule import BankLayout, MemorySchedule

CFG = TrackerConfig()


class ConditioningOnly(BankPolicy):
    """Reads no tracked frame: every step sees its object's prompted frames alone."""

    def previous(self, entries, frame, reverse, num_frames, max_pointers) -> PreviousFrames:
        return PreviousFrames(spatial=(None,) * (self.cfg.NUM_MASKMEM - 1), pointers=())

    def keeps(self, entry) -> bool:
        return False


@pytest.fixture
def conditioning_only(monkeypatch):
    monkeypatch.setitem(POLICIES, "conditioning_only", ConditioningOnly)
    return dataclasses.replace(CFG, MEMORY_POLICY="conditioning_only")


def test_sam3_policy_follows_use_memory_selection():
    assert type(bank_policy(CFG)) is SelectedFrames
    assert type(bank_policy(dataclasses.replace(CFG, USE_MEMORY_SELECTION=False))) is RecentFrames
    # A training clip's schedule has no frame scores: SAM3's policy reads recent frames there.
    assert type(bank_policy(CFG, scored=False)) is RecentFrames


def test_an_unknown_policy_is_a_config_error():
    with pytest.raises(ConfigError, match=r"MEMORY_POLICY 'nearest'.*sam3"):
        bank_policy(dataclasses.replace(CFG, MEMORY_POLICY="nearest"))


def test_a_policy_that_reads_scores_is_refused_where_there_are_none(monkeypatch):
    monkeypatch.setitem(POLICIES, "selected", SelectedFrames)
    with pytest.raises(ConfigError, match="'selected' reads frames by their scores"):
        bank_policy(dataclasses.replace(CFG, MEMORY_POLICY="selected"), scored=False)


def test_a_registered_policy_decides_every_read(conditioning_only):
    """30 tracked frames of 2 objects prompted on frames 0 and 12: with the conditioning-only policy
    every step reads its prompted frames and nothing else, and the ring keeps only the latest entry."""
    policy = bank_policy(conditioning_only, scored=False)
    assert isinstance(policy, ConditioningOnly)
    layout = BankLayout.for_video(conditioning_only, 2)
    schedule = MemorySchedule(conditioning_only, layout, 30, 2, policy=policy)
    schedule.condition(0, 0)
    schedule.condition(1, 0)
    tracked = np.ones(2, bool)
    for frame in range(1, 30):
        if frame == 12:
            schedule.condition(0, 12)
            schedule.condition(1, 12)
            continue
        reads = schedule.select(frame, False, tracked)
        cond = 1 if frame < 12 else 2
        assert reads["frame_valid"].sum(axis=1).tolist() == [cond, cond], frame
        slots = reads["frame_slot"][reads["frame_valid"]]
        assert (slots < schedule.layout.cond).all(), (frame, slots)
        pointer_slots = reads["pointer_slot"][reads["pointer_valid"]]
        assert (pointer_slots < schedule.layout.cond).all(), (frame, pointer_slots)
        schedule.record(frame, reads)
        assert [len(e) for e in schedule.entries] == [1, 1]
