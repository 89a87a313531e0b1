"""`es3 bench track`: its records, and that the JAX and PyTorch loops of each model track the same
masks from the same JPEG frames (so the benchmark times the same work in both frameworks)."""

import argparse

import numpy as np
import pytest

from benchmarks import track
from tests import upstream  # skips the module without torch and sam3

pytestmark = pytest.mark.parity

# 112 px (an 8×8 grid), a 1-block ViT, the student's perceiver cut to 32 + 4×4 latents: the loop
# stays whole (decode, trunk, neck, memory, heads, masks) at a few seconds a case.
SMALL = [
    "MODEL.TEACHER.IMAGE_SIZE", "112", "MODEL.TRUNK.DEPTH", "1", "MODEL.TRUNK.GLOBAL_BLOCKS", "[0]",
    "MODEL.PERCEIVER.NUM_LATENTS", "32", "MODEL.PERCEIVER.NUM_LATENTS_2D", "16", "MODEL.PERCEIVER.WINDOW_SIZE", "2",
]  # fmt: skip
NUM_FRAMES, OBJECTS = 6, 2
# The models with a PyTorch twin (a stage-1 trunk compiles for long and has none).
MODELS = ("teacher", "student")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    p = argparse.ArgumentParser()
    track.add_arguments(p)
    args = p.parse_args(
        ["--models", *MODELS, "--objects", str(OBJECTS), "--num_frames", str(NUM_FRAMES), "--video_size", "60", "80",
         "--workdir", str(tmp_path_factory.mktemp("track")), "--seed", str(upstream.fresh_seed()), *SMALL]
    )  # fmt: skip
    return track.track(args)


def test_records_are_whole_and_consistent(results):
    records = track.add_speedups([r.record for r in results])
    assert [(r["model"], r["framework"]) for r in records] == [
        (m, f) for m in MODELS for f in track.FRAMEWORKS
    ]
    for r in records:
        assert r["objects"] == OBJECTS and r["frames"] == NUM_FRAMES
        assert r["fps"] > 0 and r["ms_per_frame"] == pytest.approx(1e3 / r["fps"])
        assert 0 < r["trunk_ms_per_frame"] < r["ms_per_frame"]
        assert r["rest_ms_per_frame"] == pytest.approx(r["ms_per_frame"] - r["trunk_ms_per_frame"])
        assert r["trunk_share"] == pytest.approx(r["trunk_ms_per_frame"] / r["ms_per_frame"])
        assert r["ms_per_object"] == pytest.approx(r["ms_per_frame"] / OBJECTS)
        assert 0 < r["peak_gib"] < 24
        assert r["recompiled"] == 0  # the warm-up pass compiled everything the timed pass ran
    ms = {(r["model"], r["framework"]): r["ms_per_frame"] for r in records}
    student_jax = records[2]
    assert student_jax["speedup_vs_teacher"] == pytest.approx(ms["teacher", "jax"] / ms["student", "jax"])
    assert student_jax["speedup_vs_pytorch"] == pytest.approx(ms["student", "pytorch"] / ms["student", "jax"])
    assert "speedup_vs_pytorch" not in records[1] and "speedup_vs_teacher" not in records[0]


@pytest.mark.parametrize("model", MODELS)
def test_jax_and_pytorch_track_the_same_masks(results, model):
    """The last frame's logits `[H, W]`, each object's, on the scale of their largest magnitude, and
    the pixels whose mask differs. The logits differ by a little more than round-off: the frames are
    resized by different code (PIL bilinear in es3, PIL's default bicubic upstream) and es3's bank is
    bfloat16 where upstream's is float32 on a CPU (at most 1.41e-2 over 21 fresh seeds).
    Random weights draw masks of any size, down to a few dozen pixels, so the pixels that differ are
    counted against the frame, not against the mask."""
    by_framework = {r.record["framework"]: r.last_logits for r in results if r.record["model"] == model}
    ours, ref = by_framework["jax"], by_framework["pytorch"]
    assert ours.shape == ref.shape == (OBJECTS, 60, 80)
    assert np.abs(ref).max() < 1000  # tracked, not upstream's NO_OBJ_SCORE
    for k in range(OBJECTS):
        upstream.report(f"bench track {model} object {k + 1}: last frame's logits", ours[k], ref[k], 5e-2)
        differ = np.mean((ours[k] > 0) != (ref[k] > 0))
        print(f"[bench track] {model} object {k + 1}: {differ:.2%} of the pixels differ")
        assert differ <= 0.01, f"{model} object {k + 1}: {differ:.2%} of the frame's pixels differ"
