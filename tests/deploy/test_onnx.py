"""The ONNX export (`es3_jax.deploy.onnx_export`) and its onnxruntime driver (`onnx_tracker`) against
es3 JAX: the graphs read back static and standard, and a stream tracked by both gives the same masks.

One export per memory path (`es3 export --format onnx`) at the predictor tests' small geometry
(112 px, 8×8 grid), random weights drawn fresh (`ES3_TEST_SEED` replays a seed), every object scored
present so that the masks are real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from es3_jax import config as config_lib
from es3_jax import weights
from es3_jax.cli import main
from es3_jax.deploy.manifest import CONFIG, GRAPHS, INPUTS, OUTPUTS, Manifest, ManifestError
from es3_jax.deploy.onnx_engine import OnnxShapeError
from es3_jax.deploy.onnx_export import OnnxExportError, export_onnx
from es3_jax.deploy.onnx_tracker import OnnxTracker
from es3_jax.memory.policy import POLICIES
from es3_jax.params import param_dict
from es3_jax.predictor import PredictorError, VideoPredictor
from tests.memory.test_policy import ConditioningOnly
from tests.predictor.test_video_predictor import SMALL
from tests.upstream import fresh_seed, mask_iou, report, report_iou

pytestmark = pytest.mark.parity

REPO = Path(__file__).resolve().parents[2]
# One memory-attention layer: jax2onnx's conversion time grows with the square of a graph's nodes,
# and the property tested (onnxruntime computes what JAX does) does not depend on the depth.
SHALLOW = ["MODEL.TEACHER.MEMORY_ATTENTION_LAYERS", "1"]
STUDENT = [
    "MODEL.PERCEIVER.ENABLED", "True", "MODEL.PERCEIVER.NUM_LATENTS", "16", "MODEL.PERCEIVER.NUM_LATENTS_2D", "16",
    "MODEL.PERCEIVER.WINDOW_SIZE", "4", "MODEL.PERCEIVER.DEPTH", "1",
    "MODEL.MEMORY_ATTENTION.NUM_LAYERS", "1", "MODEL.MEMORY_ATTENTION.POOL_SIZE", "2",
]  # fmt: skip
OBJECTS = 2
VIDEO = (48, 64)  # (H, W) of the stream's frames
NUM_FRAMES = 10  # the bank's 7 memory frames fill by frame 7


# The student's graphs hold every operator the teacher's do and its own (the perceiver, pooling);
# the teacher's export is the same code with the tracker's memory path, run by `make test-slow`.
@pytest.fixture(scope="module", params=[pytest.param("teacher", marks=pytest.mark.slow), "student"])
def exported(request, tmp_path_factory):
    """(predictor, export folder) of one memory path: random weights with the object-score bias
    raised (every object stays present), saved as an es3 weights folder, exported by
    `es3 export --format onnx`, and the JAX predictor of the same folder with a float32 bank."""
    memory = request.param
    tmp = tmp_path_factory.mktemp(f"onnx_{memory}")
    cfg = config_lib.load(None, [*SMALL, *SHALLOW, *(STUDENT if memory == "student" else [])])
    tracker, student, trunk = VideoPredictor.from_checkpoint(
        None, config=cfg, memory=memory, seed=fresh_seed()
    ).modules()
    bias = tracker.mask_decoder.pred_obj_score_head.layers[-1].bias
    bias.set_value(bias[...] + 10.0)
    student = param_dict(student) if memory == "student" else None
    held = weights.Weights(
        cfg, "test", "weights_folder", tracker=param_dict(tracker), student=student, trunk=param_dict(trunk)
    )
    weights.save(tmp / "weights", held)
    export = ["export", "--format", "onnx", "--stage2_weights", str(tmp / "weights"), "--memory", memory]
    assert main([*export, "--output_path", str(tmp / "onnx"), "--objects", str(OBJECTS)]) == 0
    predictor = VideoPredictor.from_checkpoint(tmp / "weights", memory=memory, storage_dtype=np.float32)
    return predictor, tmp / "onnx"


def _frames() -> list[np.ndarray]:
    """Smooth random frames (the trunk sees structure, not noise) `[H, W, 3]` uint8."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: VIDEO[0], : VIDEO[1]]
    out = []
    for t in range(NUM_FRAMES):
        phase = rng.uniform(0, 6, 3)
        channels = [128 + 100 * np.sin(xx / (7 + c) + yy / (11 - c) + phase[c] + 0.2 * t) for c in range(3)]
        out.append(np.clip(np.stack(channels, -1) + rng.normal(0, 6, (*VIDEO, 3)), 0, 255).astype(np.uint8))
    return out


def _disk(cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: VIDEO[0], : VIDEO[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


def _stream(tracker) -> list[np.ndarray]:
    """Object 1 by a mask on frame 0, object 2 by a click on frame 2 (it joins later)."""
    state = tracker.init_stream()
    logits = []
    for i, image in enumerate(_frames()):
        tracker.add_frame(state, image)
        if i == 0:
            tracker.add_new_mask(state, 0, 1, _disk(20, 24, 9))
        if i == 2:
            tracker.add_new_points_or_box(state, 2, 2, points=[[44, 30]], labels=[1])
        logits.append(tracker.track_frame(state)[2])
    return logits


def test_graphs_are_static_standard_onnx(exported):
    _, folder = exported
    manifest = Manifest.load(folder)
    g, lay = manifest.grid, manifest.layout
    for name in GRAPHS:
        model = onnx.load(str(folder / manifest.graphs[name]), load_external_data=False)
        opset = {o.domain: o.version for o in model.opset_import}
        assert opset.get("", opset.get("ai.onnx", 0)) >= 17, f"{name}: opset {opset}"
        for value in [*model.graph.input, *model.graph.output]:
            dims = value.type.tensor_type.shape.dim
            assert all(d.HasField("dim_value") for d in dims), f"{name}: {value.name} is not static: {dims}"
        assert [v.name for v in model.graph.input] == list(INPUTS[name]), name
        assert [v.name for v in model.graph.output] == list(OUTPUTS[name]), name
        domains = {n.domain for n in model.graph.node} - {"", "ai.onnx"}
        assert not domains, f"{name}: custom operator domains {domains}"

    def shape(name: str, value: str) -> list[int]:
        model = onnx.load(str(folder / manifest.graphs[name]), load_external_data=False)
        (v,) = [v for v in [*model.graph.input, *model.graph.output] if v.name == value]
        return [d.dim_value for d in v.type.tensor_type.shape.dim]

    data = sorted(folder.glob("*.onnx.data"))
    assert data, "no graph keeps its weights as external data"
    for path in data:  # readable as the graph beside it is, not tempfile's 0600
        assert path.stat().st_mode == path.with_suffix("").stat().st_mode, path.name

    assert shape("image_encoder", "image") == [1, 112, 112, 3]
    assert shape("track_step", "bank_tokens") == [OBJECTS, lay.slots, *manifest.tokens]
    assert shape("track_step", "frame_slot") == [OBJECTS, lay.spatial_reads]
    assert shape("track_step", "low_res_masks") == [OBJECTS, 4 * g, 4 * g]
    assert shape("click_prompt", "point_coords") == [1, 1, 2]


def _same_stream(label: str, ours: list[np.ndarray], ref: list[np.ndarray]) -> None:
    """`_stream`'s logits from onnxruntime (`ours`) against JAX's, frame by frame at video resolution.

    Object 1 (a mask prompt) and object 2 on its click frame agree to float32 rounding, 1e-4 of
    their scale. Object 2's later frames read a memory encoded from its click's mask binarised at 0
    (upstream's rule for clicks): a step, so a pixel within float32 rounding of 0 can fall on either
    side in the two engines (with ES3_TEST_SEED=437123996, 7.5e-4 of the scale on frame 3, fading
    after); they agree to 1e-2 of their scale, where a wrong read or write of the bank moves them by
    tenths of it (`test_a_bank_policy_plugs_into_both_engines`). Masks: IoU ≥ 0.999 over the pixels
    decided beyond each group's tolerance (`mask_iou`).
    """
    assert [x.shape for x in ours] == [x.shape for x in ref]
    assert ref[-1].shape[0] == OBJECTS and (ref[-1] > 0).any()
    exact = [(a[0], b[0]) for a, b in zip(ours[1:], ref[1:], strict=True)] + [(ours[2][1], ref[2][1])]
    report(f"{label} logits (prompt frames' memories)", *map(np.stack, zip(*exact, strict=True)), 1e-4)
    binarised = [(a[1], b[1]) for a, b in zip(ours[3:], ref[3:], strict=True)]
    report(f"{label} logits (a click's binarised memory)", *map(np.stack, zip(*binarised, strict=True)), 1e-2)
    iou = min(mask_iou(o, r, 1e-4) for o, r in exact)
    report_iou(f"{label} masks (prompt frames' memories)", iou, 0.999)
    iou = min(mask_iou(o, r, 1e-2) for o, r in binarised)
    report_iou(f"{label} masks (a click's binarised memory)", iou, 0.999)


def test_stream_matches_jax(exported):
    """Every frame's logits at video resolution, onnxruntime against the JAX predictor."""
    predictor, folder = exported
    _same_stream(
        f"onnx {predictor.memory} stream", _stream(OnnxTracker(folder, threads=1)), _stream(predictor)
    )


def test_mismatched_inputs_are_refused(exported):
    _, folder = exported
    tracker = OnnxTracker(folder, threads=1)
    with pytest.raises(
        OnnxShapeError, match=r"image is float32\[1, 64, 64, 3\].*\[1, 112, 112, 3\].*--image_size"
    ):
        tracker.run("image_encoder", {"image": np.zeros((1, 64, 64, 3), np.float32)})
    types = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
    inputs = {i.name: np.zeros(i.shape, types[i.type]) for i in tracker.sessions["track_step"].get_inputs()}
    tracker.run("track_step", inputs)  # the export's own shapes run
    m = tracker.manifest
    inputs["bank_tokens"] = np.zeros((OBJECTS + 1, m.layout.slots, *m.tokens), np.float32)
    with pytest.raises(OnnxShapeError, match=r"bank_tokens is float32\[3, .*--objects"):
        tracker.run("track_step", inputs)
    state = tracker.init_stream()
    frame = _frames()[0]
    tracker.add_frame(state, frame)
    with pytest.raises(OnnxShapeError, match=r"2 points .* takes 1.*--points"):
        tracker.add_new_points_or_box(state, 0, 1, points=[[1, 1], [5, 5]], labels=[1, 0])
    for obj in range(OBJECTS):
        tracker.add_new_mask(state, 0, obj + 1, _disk(20, 24, 9))
    with pytest.raises(PredictorError, match=f"tracks {OBJECTS} objects.*--objects"):
        tracker.add_new_mask(state, 0, 99, _disk(20, 24, 9))


def test_driver_imports_no_jax(exported):
    """The driver tracks with jax, flax and torch unimportable."""
    _, folder = exported
    script = (
        "import sys\n"
        "for m in ('jax', 'jaxlib', 'flax', 'torch', 'jax2onnx'): sys.modules[m] = None\n"
        "import numpy as np\n"
        "from es3_jax.deploy.onnx_tracker import OnnxTracker\n"
        f"t = OnnxTracker({str(folder)!r}, threads=1)\n"
        "s = t.init_stream()\n"
        "mask = np.zeros((48, 64), bool); mask[10:30, 10:30] = True\n"
        "for i in range(3):\n"
        "    t.add_frame(s, np.full((48, 64, 3), 40 * i, np.uint8))\n"
        "    if i == 0: t.add_new_mask(s, 0, 1, mask)\n"
        "    print(t.track_frame(s)[2].shape)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["(1,", "48,", "64)"] * 3


def test_incomplete_or_occupied_folders_are_refused(exported, tmp_path):
    predictor, folder = exported
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial, ignore=shutil.ignore_patterns("track_step.onnx*"))
    with pytest.raises(ManifestError, match=r"missing track_step\.onnx"):
        OnnxTracker(partial)
    assert (
        main(
            [
                "export",
                "--format",
                "onnx",
                "--stage2_weights",
                "w",
                "--sam3_weights",
                "s",
                "--output_path",
                "o",
            ]
        )
        == 2
    )
    with pytest.raises(OnnxExportError, match=r"not empty.*--overwrite"):
        export_onnx(predictor, partial, graphs=["mask_prompt"])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(OnnxExportError, match="not an ONNX export of es3"):
        export_onnx(predictor, tmp_path / "notes", graphs=["mask_prompt"], overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    with pytest.raises(OnnxExportError, match="unknown graphs"):
        export_onnx(predictor, tmp_path / "new", graphs=["decoder"])


def test_export_command_checks_its_flags(tmp_path, capsys):
    """Each format's flags, refused before any weights are read."""
    base = ["export", "--stage2_weights", str(tmp_path / "absent"), "--output_path", str(tmp_path / "out")]
    assert main([*base, "--format", "onnx", "--sam3_weights", "sam3.pt"]) == 2
    assert "drop --sam3_weights" in capsys.readouterr().err
    assert main([*base, "--format", "pt"]) == 2
    assert "needs --sam3_weights" in capsys.readouterr().err


def test_a_bank_policy_plugs_into_both_engines(exported, tmp_path, monkeypatch):
    """The conditioning-only policy of tests/memory/test_policy.py, named by the config of each engine:
    onnxruntime and JAX track the stream alike with it; their masks equal SAM3's policy's until a step
    would read a tracked frame (frame 2 reads frame 1), and differ from there on."""
    monkeypatch.setitem(POLICIES, "conditioning_only", ConditioningOnly)
    predictor, folder = exported
    policy = ["MODEL.TEACHER.MEMORY_POLICY", "conditioning_only"]
    onnx_folder = tmp_path / "onnx"
    shutil.copytree(folder, onnx_folder)
    config_lib.save(config_lib.load(onnx_folder / CONFIG, policy), onnx_folder / CONFIG)
    jax_policy = VideoPredictor.from_checkpoint(
        folder.parent / "weights", memory=predictor.memory, storage_dtype=np.float32, overrides=policy
    )
    ref = _stream(jax_policy)
    label = f"onnx {predictor.memory} stream, conditioning-only policy"
    _same_stream(label, _stream(OnnxTracker(onnx_folder, threads=1)), ref)
    sam3 = _stream(predictor)
    for frame in (0, 1):
        np.testing.assert_array_equal(
            ref[frame], sam3[frame], err_msg=f"frame {frame}: no tracked frame to read"
        )
    # Object 1's logits on every later frame: ten times the engines' agreement (`_same_stream`) apart.
    moved = [float(np.abs(a[0] - b[0]).max()) for a, b in zip(ref[2:], sam3[2:], strict=True)]
    scale = max(float(np.abs(x[0]).max()) for x in sam3[2:])
    print(f"[policy] object 1's logits moved by {[round(m, 3) for m in moved]}, scale {scale:.2f}")
    assert min(moved) > 1e-3 * scale, (
        f"object 1's logits barely moved with the policy: {moved} (scale {scale})"
    )
