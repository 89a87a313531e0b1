"""VideoPredictor behaviour on a small random-weight config: one compilation, objects joining
later, prompts of any size, and memory that stays flat with video length."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from es3_jax import config as config_lib
from es3_jax import weights
from es3_jax.data.embedding_store import EmbeddingStore, identity
from es3_jax.logits import NO_OBJ_SCORE
from es3_jax.memory.path import MemoryPath
from es3_jax.models.student import student_from_config
from es3_jax.models.tracker import SAM3Tracker, build_tracker
from es3_jax.params import flatten, param_dict, unflatten
from es3_jax.predictor import VideoPredictor
from tests.figures import REORDERED
from tests.train.runs import cli_env

# 112 px -> an 8×8 grid; a 64-wide trunk output stands in for SAM3's 1024.
SMALL = [
    "MODEL.TEACHER.IMAGE_SIZE", "112", "MODEL.TEACHER.TRUNK_DIM", "64", "MODEL.TRUNK.WIDTH", "64",
    "MODEL.TRUNK.NUM_HEADS", "2", "MODEL.TRUNK.MLP_DIM", "128", "MODEL.TRUNK.DEPTH", "1",
    "MODEL.TRUNK.GLOBAL_BLOCKS", "[0]", "MODEL.TRUNK.WINDOW_SIZE", "8", "MODEL.TRUNK.PRETRAIN_IMAGE_SIZE", "112",
]  # fmt: skip
REPO = Path(__file__).resolve().parents[2]
# A stream's bank grows as objects join (batches of 1, 2, then 3 rows where the offline pass has 3
# throughout) and tracking feeds each frame's rounding into the next: logits agree to this share of
# their scale, not to REORDERED.
STREAM_TOLERANCE = 1e-3


def _predictor(selection: bool = True):
    overrides = [*SMALL, "MODEL.TEACHER.USE_MEMORY_SELECTION", str(selection)]
    return VideoPredictor.from_checkpoint(None, overrides=overrides, memory="teacher")


def _disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r**2


@pytest.mark.parametrize("selection", [False, True], ids=["no_selection", "selection"])
def test_forty_frames_compile_the_step_once(selection):
    predictor = _predictor(selection)
    features = np.random.default_rng(0).standard_normal((40, 8, 8, 64)).astype(np.float32)
    state = predictor.init_state(features, video_size=(30, 40))
    predictor.add_new_mask(state, 0, 1, _disk(30, 40, 10, 12, 6))
    # A prompt of another size than the video (1 px narrower), and an object that joins on frame 5.
    predictor.add_new_mask(state, 5, 7, _disk(30, 39, 20, 25, 7))
    seen = []
    for frame, ids, logits in predictor.propagate_in_video(state):
        assert ids == [1, 7] and logits.shape == (2, 30, 40) and logits.dtype == np.float32
        assert np.isfinite(logits).all()
        if frame < 5:
            assert (logits[1] == NO_OBJ_SCORE).all()
        seen.append(frame)
    assert seen == list(range(40))
    assert predictor.trace_counts["track_step"] == 1
    assert predictor.timings["frames"] == 40
    # The bank holds at most the prompted frames plus num_maskmem recent frames, whatever the length.
    entries = state.memory.schedule.entries
    assert all(sum(e.slot is not None for e in obj) <= 7 for obj in entries)
    assert all(len(obj) <= 16 for obj in entries)


def test_reverse_from_a_later_prompt_and_reset():
    predictor = _predictor()
    features = np.random.default_rng(1).standard_normal((6, 8, 8, 64)).astype(np.float32)
    state = predictor.init_state(features, video_size=(30, 40))
    frame, ids, logits = predictor.add_new_points_or_box(state, 4, 3, points=[[20, 15]], labels=[1])
    assert (frame, ids, logits.shape) == (4, [3], (1, 30, 40))
    predictor.add_new_points_or_box(state, 4, 3, box=[5, 5, 30, 25])
    frames = [f for f, _, _ in predictor.propagate_in_video(state, reverse=True)]
    assert frames == [4, 3, 2, 1, 0]
    predictor.reset_state(state)
    assert state.obj_ids == [] and state.memory is None
    with pytest.raises(Exception, match="no prompts"):
        list(predictor.propagate_in_video(state))


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import jax
    import numpy as np
    from es3_jax.data.embedding_store import EmbeddingStore
    from es3_jax.predictor import VideoPredictor

    def held():
        return {"rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "device_bytes": sum(a.nbytes for a in jax.live_arrays())}

    store_root, num_frames, early = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = EmbeddingStore(store_root)
    stored = int(store.metadata("long")["num_frames"])
    predictor = VideoPredictor.from_checkpoint(None, overrides=json.loads(sys.argv[4]), memory="teacher")
    state = predictor.init_stream(video_size=(30, 40))
    yy, xx = np.mgrid[:30, :40]
    for i in range(num_frames):
        # The stored frames over and over: a stream as long as asked for.
        predictor.add_frame(state, store.read("long", [i % stored], dtype=np.float32)[0])
        if i == 0:
            predictor.add_new_mask(state, 0, 1, (yy - 12) ** 2 + (xx - 15) ** 2 < 49)
        if i == 30:  # an object that joins later
            predictor.add_new_points_or_box(state, 30, 2, points=[[30, 20]], labels=[1])
        if 5 <= i <= 8 or (i >= early and i % 25 == 0):
            # Prompts on five frames in a row outgrow the 4 conditioning slots once; then one
            # every 25 frames, whose old slots are freed as no later frame reads them.
            predictor.add_new_points_or_box(state, i, 1, points=[[15, 12]], labels=[1])
        predictor.track_frame(state)
        if i + 1 == early:
            at_early = held()
    at_end = held()
    cond = [len(slots) for slots in state.memory.schedule.cond_slots]
    print(json.dumps({"frames": state.num_frames, "early": at_early, "end": at_end,
                      "traces": predictor.trace_counts, "cond_slots": cond,
                      "prompted_frames": [len(f) for f in state.prompts.values()]}))
    """
)


def _peak_memory(tmp_path: Path, num_frames: int, early: int) -> None:
    """A stream of `num_frames` frames: what the device holds after `early` frames (the bank long
    full) and at the end is the same (the bank is bounded), and the process's peak RSS grows by at
    most 5 %."""
    store = EmbeddingStore(tmp_path / "store")
    rng = np.random.default_rng(0)
    writer = store.begin_video(
        "long",
        frame_names=[f"{i:05d}" for i in range(100)],
        feature_shape=(8, 8, 64),
        dtype="float32",
        ident=identity("random", (0.5,) * 3, (0.5,) * 3, 112),
    )
    for start in range(0, 100, 50):
        writer.write(start, rng.standard_normal((50, 8, 8, 64)).astype(np.float32))
    writer.commit()
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _PEAK_SCRIPT,
            str(tmp_path / "store"),
            str(num_frames),
            str(early),
            json.dumps(SMALL),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=cli_env(),  # the session's compilation cache and compile speed, one CPU device
        timeout=1800,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    # 1 object, then 2; the conditioning slots grow once, from 4 to 8, and no more.
    assert out["frames"] == num_frames and out["traces"]["track_step"] <= 3
    assert out["cond_slots"][0] <= 8 and out["prompted_frames"][0] <= 8
    early_held, end = out["early"], out["end"]
    ratio = end["rss_kb"] / early_held["rss_kb"]
    print(
        f"[memory] streamed {early} frames: {early_held['device_bytes'] / 2**20:.2f} MiB on the device, peak RSS "
        f"{early_held['rss_kb'] / 1024:.0f} MiB; {num_frames} frames: {end['device_bytes'] / 2**20:.2f} MiB, "
        f"{end['rss_kb'] / 1024:.0f} MiB (ratio {ratio:.3f})"
    )
    assert end["device_bytes"] == early_held["device_bytes"]
    assert ratio <= 1.05


def test_peak_memory_is_flat_with_stream_length(tmp_path):
    _peak_memory(tmp_path, 150, 50)


@pytest.mark.slow
def test_peak_memory_is_flat_over_two_thousand_streamed_frames(tmp_path):
    _peak_memory(tmp_path, 2000, 100)


def test_a_training_run_folder_loads_its_student(tmp_path):
    """`es3 train` writes <run>/weights with the tracker and the student; the run folder names it."""

    cfg = config_lib.load(
        None, [*SMALL, "MODEL.PERCEIVER.NUM_LATENTS_2D", "4", "MODEL.PERCEIVER.WINDOW_SIZE", "2"]
    )
    student = param_dict(student_from_config(cfg, seed=3))
    tracker = param_dict(SAM3Tracker(cfg.MODEL.TEACHER, rngs=nnx.Rngs(2)))
    trained = weights.Weights(cfg, "es3 train", "weights_folder", tracker=tracker, student=student)
    weights.save(tmp_path / "run" / "weights", trained)

    predictor = VideoPredictor.from_checkpoint(tmp_path / "run")
    memory = predictor.engine.memory_path()
    assert isinstance(memory, MemoryPath) and memory.spatial_perceiver is not None
    loaded = flatten(param_dict(memory))
    for path, value in flatten(student).items():
        np.testing.assert_array_equal(loaded[path], value, err_msg=path)


@functools.cache
def _present_objects_weights(selection: bool) -> tuple[config_lib.Config, dict]:
    """The SMALL teacher's random weights with an object-score head that says "present" (bias 10):
    random weights may judge every object absent, and NO_OBJ_SCORE everywhere compares nothing."""
    loaded = weights.load(None, overrides=[*SMALL, "MODEL.TEACHER.USE_MEMORY_SELECTION", str(selection)])
    params = flatten(loaded.tracker)
    bias = "mask_decoder.pred_obj_score_head.layers.2.bias"
    params[bias] = np.full_like(params[bias], 10.0)
    return loaded.cfg, unflatten(params)


def _present_objects_predictor(objects_per_batch: int | None, selection: bool = True) -> VideoPredictor:
    cfg, params = _present_objects_weights(selection)
    tracker = build_tracker(cfg.MODEL.TEACHER, params)
    return VideoPredictor(cfg, tracker, objects_per_batch=objects_per_batch)


def _moving_video(num_frames: int, h: int = 30, w: int = 40) -> np.ndarray:
    """Frames `[T, H, W, 3]` uint8: two discs drifting over a textured background."""
    rng = np.random.default_rng(5)
    background = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    frames = np.repeat(background[None], num_frames, axis=0)
    for t in range(num_frames):
        frames[t][_disk(h, w, 10 + t * 0.3, 12 + t * 0.4, 6)] = (250, 40, 40)
        frames[t][_disk(h, w, 20, 30 - t * 0.3, 5)] = (40, 40, 250)
    return frames


@pytest.mark.numerics
@pytest.mark.parametrize("objects_per_batch", [None, 1], ids=["one_batch", "batches_of_1"])
def test_a_stream_tracks_as_propagate_in_video(objects_per_batch):
    """24 frames, prompts on two frames (a mask on frame 0; on frame 9 clicks for a second object and
    a box for a third that join there): the masks of each streamed frame equal the offline pass's."""
    predictor = _present_objects_predictor(objects_per_batch)
    frames = _moving_video(24)

    def prompt(state, frame_idx):
        if frame_idx == 0:
            predictor.add_new_mask(state, 0, 1, _disk(30, 40, 10, 12, 6))
        if frame_idx == 9:
            predictor.add_new_points_or_box(state, 9, 2, points=[[27, 20], [5, 5]], labels=[1, 0])
            predictor.add_new_points_or_box(state, 9, 4, box=[20, 2, 38, 14])

    offline = predictor.init_state(frames)
    prompt(offline, 0)
    prompt(offline, 9)
    expected = list(predictor.propagate_in_video(offline))
    assert [f for f, _, _ in expected] == list(range(24))

    stream = predictor.init_stream()
    worst, flips = 0.0, 0
    for (frame_idx, ids, logits), image in zip(expected, frames, strict=True):
        assert predictor.add_frame(stream, image) == frame_idx
        prompt(stream, frame_idx)
        got_idx, got_ids, got = predictor.track_frame(stream)
        assert got_idx == frame_idx
        assert got_ids == ids[: len(got_ids)]
        full = np.full_like(logits, NO_OBJ_SCORE)
        full[: len(got_ids)] = got
        if objects_per_batch == 1:  # the same computation, batch for batch
            np.testing.assert_array_equal(full, logits, err_msg=f"frame {frame_idx}")
        real = np.abs(logits[np.abs(logits) < -NO_OBJ_SCORE])
        scale = max(real.max(initial=0.0), 1.0)
        worst = max(worst, float(np.abs(full - logits).max() / scale))
        # A pixel whose logit lies within the tolerance of 0 may take either sign.
        decided = np.abs(logits) > STREAM_TOLERANCE * scale
        flips += int(((full > 0) != (logits > 0))[decided].sum())
    print(
        f"[stream] {objects_per_batch=}: max |Δ logit| / max |logit| {worst:.2e}, decided mask pixels that differ: {flips}"
    )
    assert worst <= STREAM_TOLERANCE and flips == 0
    assert got_ids == [1, 2, 4]
    assert (expected[-1][2] > 0).any(axis=(1, 2)).all(), "every object has a mask at the end"
    # Prompts go on the newest frame, before it is tracked; earlier frames are gone.
    with pytest.raises(Exception, match="tracked already"):
        predictor.add_new_mask(stream, 23, 1, _disk(30, 40, 10, 12, 6))
    with pytest.raises(Exception, match="only the newest frame"):
        predictor.add_new_points_or_box(stream, 3, 1, points=[[5, 5]], labels=[1])
    with pytest.raises(Exception, match="frame by frame"):
        list(predictor.propagate_in_video(stream))


@pytest.mark.numerics
def test_a_pass_reads_a_later_prompt_that_a_stream_has_not_seen():
    """The other side of `test_a_stream_tracks_as_propagate_in_video`: object 1, prompted on frame 0,
    gets clicks on frame 8 as well. The pass reads frame 8's conditioning memory from frame 1 on, as
    upstream's does; the stream has not seen frame 8 yet: frames 1-7 differ far beyond the streams'
    tolerance, and the prompted frames 0 and 8 are the same prompts' outputs in both."""
    predictor = _present_objects_predictor(None)
    frames = _moving_video(10)

    def prompt(state, frame_idx):
        if frame_idx == 0:
            predictor.add_new_mask(state, 0, 1, _disk(30, 40, 10, 12, 6))
        if frame_idx == 8:
            predictor.add_new_points_or_box(state, 8, 1, points=[[19, 15]], labels=[1])

    offline = predictor.init_state(frames)
    prompt(offline, 0)
    prompt(offline, 8)
    expected = [logits for _, _, logits in predictor.propagate_in_video(offline)]
    stream = predictor.init_stream()
    streamed = []
    for frame_idx, image in enumerate(frames):
        predictor.add_frame(stream, image)
        prompt(stream, frame_idx)
        streamed.append(predictor.track_frame(stream)[2])
    scale = max(float(np.abs(x).max()) for x in expected[1:8])
    gaps = [float(np.abs(a - b).max()) / scale for a, b in zip(streamed, expected, strict=True)]
    print(
        f"[stream] a later prompt of a tracked object: |Δ logit| / scale per frame {np.round(gaps, 4).tolist()}"
    )
    assert gaps[0] == 0 and gaps[8] == 0, "a prompted frame's output is its prompt's"
    assert min(gaps[1:8]) > 10 * STREAM_TOLERANCE, f"the pass did not read the later prompt: {gaps}"


def _batches_against_alone(num_objects: int, objects_per_batch: int, num_frames: int) -> None:
    """`num_objects` discs on a grid, prompted on frames 0 and 2, in batches of `objects_per_batch`
    (the last one padded) against one batch of them all and against each object tracked alone
    (memory selection off: with it, a frame's score is over the objects tracked together, as
    upstream's)."""
    features = np.random.default_rng(2).standard_normal((num_frames, 8, 8, 64)).astype(np.float32)
    side = int(np.ceil(np.sqrt(num_objects)))
    h = w = 14 * side
    discs = [_disk(h, w, 7 + 14 * (k // side), 7 + 14 * (k % side), 5) for k in range(num_objects)]

    def track(predictor, objects):
        state = predictor.init_state(features, video_size=(h, w))
        for k in objects:
            predictor.add_new_mask(state, 2 * (k % 2), k + 1, discs[k])
        return np.stack([x for _, _, x in predictor.propagate_in_video(state, start_frame_idx=0)])

    in_batches = _present_objects_predictor(objects_per_batch, selection=False)
    batched = track(in_batches, range(num_objects))
    assert in_batches.trace_counts["track_step"] == 1
    assert (batched[-1] > 0).any(axis=(1, 2)).all(), "every object has a mask at the end"
    predictor = _present_objects_predictor(None, selection=False)
    whole = track(predictor, range(num_objects))
    alone = np.concatenate([track(predictor, [k]) for k in range(num_objects)], axis=1)
    for name, other in (("one batch", whole), ("each alone", alone)):
        err = np.abs(batched - other).max() / np.abs(other).max()
        iou = min(
            ((batched[:, k] > 0) & (other[:, k] > 0)).sum()
            / max(((batched[:, k] > 0) | (other[:, k] > 0)).sum(), 1)
            for k in range(num_objects)
        )
        print(
            f"[batches] {num_objects} objects in batches of {objects_per_batch} against {name}: "
            f"max |Δlogit| / max|logit| {err:.2e}, worst IoU {iou:.6f}"
        )
        assert err <= REORDERED and iou >= 0.999, name


@pytest.mark.numerics
def test_objects_in_batches_track_as_each_object_alone():
    _batches_against_alone(5, 2, 10)


@pytest.mark.slow
def test_a_hundred_and_twenty_eight_objects_in_batches_of_32_track_as_each_alone():
    _batches_against_alone(128, 32, 6)
