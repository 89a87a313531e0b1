"""Clip sampling: windows, the visible-on-the-first-frame rule, reversal, objects, determinism."""

from pathlib import Path

import numpy as np
import pytest

from es3_jax.data import clips, sav, videos

FIXTURE = (
    Path(__file__).resolve().parents[2]
    / ".."
    / "shared"
    / "fixtures"
    / "sav_example"
    / "sav_000001_manual.json"
)


def _entry(frame_numbers, visible, name="v"):
    frame_numbers = np.asarray(frame_numbers, np.int64)
    return videos.VideoEntry(
        name=name,
        source="sav",
        annotation=(),
        stems=tuple(f"{f:05d}" for f in frame_numbers),
        frame_numbers=frame_numbers,
        frame_positions=np.arange(len(frame_numbers)),
        visible=np.asarray(visible, bool),
        objects=tuple(range(np.asarray(visible).shape[1])),
        height=8,
        width=8,
    )


def test_windows_respect_spacing_and_gaps():
    numbers = np.array([0, 4, 8, 12, 20, 24, 28, 32])  # frame 16 missing
    w = clips.windows(numbers, 3, 4)
    np.testing.assert_array_equal(w, [[0, 1, 2], [1, 2, 3], [4, 5, 6], [5, 6, 7]])
    np.testing.assert_array_equal(clips.windows(numbers, 2, 8), [[0, 2], [1, 3], [3, 4], [4, 6], [5, 7]])
    assert clips.windows(numbers, 9, 4).shape == (0, 9)


def test_first_frame_must_show_an_object_in_playback_order():
    visible = np.zeros((12, 2), bool)
    visible[5, 1] = True  # only annotated frame 5 shows anything
    entry = _entry(np.arange(12) * 4, visible)
    spec = clips.ClipSpec(num_frames=4, frame_skip=4, max_objects=3, reverse_prob=0.5)
    seen = set()
    for i in range(200):
        c = clips.sample_clip(entry, spec, clips.clip_rng(0, 0, i))
        assert c.positions[0] == 5 and list(c.objects) == [1]
        step = -1 if c.reversed else 1
        np.testing.assert_array_equal(np.diff(c.positions), [step] * 3)
        seen.add(c.reversed)
    assert seen == {False, True}
    # Only a backward clip can start at the last frame: drawn even when reversal is never asked for.
    visible = np.zeros((12, 1), bool)
    visible[11] = True
    c = clips.sample_clip(
        _entry(np.arange(12) * 4, visible), clips.ClipSpec(4, 4, 3, 0.0), clips.clip_rng(0, 0, 0)
    )
    assert c.reversed and list(c.positions) == [11, 10, 9, 8]
    assert not clips.can_sample(_entry(np.arange(3) * 4, np.ones((3, 1))), clips.ClipSpec(4, 4, 3))


def test_objects_and_uniform_starts():
    visible = np.ones((20, 6), bool)
    visible[:, 4] = False
    entry = _entry(np.arange(20) * 4, visible)
    spec = clips.ClipSpec(num_frames=8, frame_skip=8, max_objects=3)
    starts = []
    for i in range(600):
        c = clips.sample_clip(entry, spec, clips.clip_rng(3, 1, i))
        assert len(c.objects) == 3 and 4 not in c.objects and list(c.objects) == sorted(set(c.objects))
        starts.append(int(c.positions[0]))
    counts = np.bincount(starts, minlength=20)
    assert set(np.flatnonzero(counts)) == set(range(6))  # windows of 8 frames 2 apart start at 0..5
    assert counts[:6].min() > 60  # roughly uniform (expected 100 each)


def test_pure_function_of_seed_epoch_index():
    rng = np.random.default_rng(0)
    entries = [_entry(np.arange(30) * 4, rng.random((30, 4)) > 0.5, name=f"v{i}") for i in range(7)]
    spec = clips.ClipSpec(num_frames=8, frame_skip=4, max_objects=2, reverse_prob=0.5)

    def draw(seed, epoch, index):
        video = int(clips.mixed_epoch_order(seed, epoch, [len(entries)], [1.0])[index])
        c = clips.sample_clip(entries[video], spec, clips.clip_rng(seed, epoch, index), video=video)
        return c.video, tuple(c.positions), tuple(c.objects), c.reversed

    a = [draw(0, e, i) for e in range(2) for i in range(7)]
    b = [draw(0, e, i) for e in reversed(range(2)) for i in reversed(range(7))][::-1]
    assert a == b  # independent of the order of the calls
    assert sorted(v for v, *_ in a[:7]) == list(range(7))  # an epoch visits every video once
    assert a[:7] != a[7:] and a != [draw(1, e, i) for e in range(2) for i in range(7)]
    np.testing.assert_array_equal(clips.epoch_order(5, 2, 7), clips.epoch_order(5, 2, 7))


@pytest.mark.parametrize("sizes,weights", [((100, 1000), (0.7, 0.3)), ((40, 40, 400), (1, 1, 2)), ((9, 3), (0.5, 0.5))])
def test_a_mixed_epoch_gives_each_source_its_share_without_repeats(sizes, weights):
    order = clips.mixed_epoch_order(3, 1, sizes, weights)
    quotas = clips.source_quotas(sizes, weights)
    share = np.asarray(weights) / np.sum(weights)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    which = np.searchsorted(offsets, order, side="right") - 1
    assert len(order) == quotas.sum() == len(set(order.tolist()))  # no item twice in an epoch
    np.testing.assert_array_equal(np.bincount(which, minlength=len(sizes)), quotas)
    np.testing.assert_allclose(quotas / quotas.sum(), share, atol=1.0 / quotas.sum())
    # the epoch is as long as the first source to run out allows, which it uses whole
    assert (quotas == np.asarray(sizes)).any() or min(np.asarray(sizes) - quotas) <= 1
    assert not np.array_equal(order, clips.mixed_epoch_order(3, 2, sizes, weights))
    np.testing.assert_array_equal(order, clips.mixed_epoch_order(3, 1, sizes, weights))


@pytest.mark.skipif(not FIXTURE.is_file(), reason="fixture sav_example not available")
def test_sampler_on_the_sav_example():
    """Manual object 3 is only in clips whose first frame is at or after annotated frame 113."""
    ann = sav.read_sav_json(FIXTURE)
    entry, _ = sav.index_sav_video("sav_000001", [FIXTURE], [f"{4 * i:05d}" for i in range(121)])
    spec = clips.ClipSpec(num_frames=8, frame_skip=4, max_objects=5, reverse_prob=0.5)
    areas = ann.areas()
    for i in range(100):
        c = clips.sample_clip(entry, spec, clips.clip_rng(0, 0, i))
        first = int(c.positions[0])
        np.testing.assert_array_equal(c.objects, np.flatnonzero(areas[first] > 0))
        if 3 in c.objects:
            assert first >= 113
    e = clips.eval_clip(entry, spec)
    assert list(e.positions) == list(range(8)) and not e.reversed
