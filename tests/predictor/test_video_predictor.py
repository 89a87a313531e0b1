"""VideoPredictor behaviour on a small random-weight config: one compilation, objects joining
later, prompts of any size, and memory that stays flat with video length."""

from __future__ import annotations

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
from es3_jax.models.memory_path import MemoryPath
from es3_jax.models.sam_heads import NO_OBJ_SCORE
from es3_jax.models.student import student_from_config
from es3_jax.models.tracker import SAM3Tracker
from es3_jax.params import flatten, param_dict
from es3_jax.predictor import VideoPredictor

# 112 px -> an 8×8 grid; a 64-wide trunk output stands in for SAM3's 1024.
SMALL = [
    "MODEL.TEACHER.IMAGE_SIZE", "112", "MODEL.TEACHER.TRUNK_DIM", "64", "MODEL.TRUNK.WIDTH", "64",
    "MODEL.TRUNK.NUM_HEADS", "2", "MODEL.TRUNK.MLP_DIM", "128", "MODEL.TRUNK.DEPTH", "1",
    "MODEL.TRUNK.GLOBAL_BLOCKS", "[0]", "MODEL.TRUNK.WINDOW_SIZE", "8", "MODEL.TRUNK.PRETRAIN_IMAGE_SIZE", "112",
]  # fmt: skip
REPO = Path(__file__).resolve().parents[2]


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
    predictor = VideoPredictor.from_checkpoint(None, overrides=json.loads(sys.argv[4]), memory="teacher")
    state = predictor.init_state((store, "long"), video_size=(30, 40))
    yy, xx = np.mgrid[:30, :40]
    predictor.add_new_mask(state, 0, 1, (yy - 12) ** 2 + (xx - 15) ** 2 < 49)
    done = 0
    for frame, _, logits in predictor.propagate_in_video(state, max_frame_num_to_track=num_frames - 1):
        done += 1
        # Both points inside the loop, so the generator holds the same kind of frame state at each.
        if done == early:
            at_early = held()
        if done == num_frames:
            at_end = held()
    print(json.dumps({"frames": done, "early": at_early, "end": at_end, "traces": predictor.trace_counts}))
    """
)


def test_peak_memory_is_flat_with_video_length(tmp_path):
    """One run of 200 frames: what the device holds after frame 50 (the bank long full) and at the end is the same (the
    bank is bounded), and the process's peak RSS grows by at most 5 %."""
    store = EmbeddingStore(tmp_path / "store")
    rng = np.random.default_rng(0)
    writer = store.begin_video(
        "long",
        frame_names=[f"{i:05d}" for i in range(200)],
        feature_shape=(8, 8, 64),
        dtype="float32",
        ident=identity("random", (0.5,) * 3, (0.5,) * 3, 112),
    )
    for start in range(0, 200, 50):
        writer.write(start, rng.standard_normal((50, 8, 8, 64)).astype(np.float32))
    writer.commit()
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "store"), "200", "50", json.dumps(SMALL)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["frames"] == 200 and out["traces"]["track_step"] == 1
    early, end = out["early"], out["end"]
    ratio = end["rss_kb"] / early["rss_kb"]
    print(
        f"[memory] after 50 frames: {early['device_bytes'] / 2**20:.2f} MiB on the device, peak RSS "
        f"{early['rss_kb'] / 1024:.0f} MiB; after 200: {end['device_bytes'] / 2**20:.2f} MiB, "
        f"{end['rss_kb'] / 1024:.0f} MiB (ratio {ratio:.3f})"
    )
    assert end["device_bytes"] == early["device_bytes"]
    assert ratio <= 1.05


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
    memory = nnx.merge(predictor._memory_def, predictor._memory_state)
    assert isinstance(memory, MemoryPath) and memory.spatial_perceiver is not None
    loaded = flatten(param_dict(memory))
    for path, value in flatten(student).items():
        np.testing.assert_array_equal(loaded[path], value, err_msg=path)
