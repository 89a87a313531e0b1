"""The merged PyTorch export (`porting.export`, `es3 export`) and its PyTorch tracker
(`porting.torch_student.load_efficient_sam3`): tracking parity with the JAX student, the round
trip back into es3, byte-exact base keys, and the refusals.

The base is an upstream tracker with random weights at a reduced input size (224 px -> a 16×16
grid; the parameters are SAM3's), written as sam3.pt. The student's 2-D latents are reduced to a
4×4 grid so that a case runs in well under a minute on a CPU.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from es3_jax import checkpoints, weights
from es3_jax import config as config_lib
from es3_jax.cli import build_parser, main
from es3_jax.params import ParamMismatchError, flatten
from es3_jax.predictor import VideoPredictor
from tests import upstream
from tests.train.runs import cli_env

torch = upstream.torch

from porting.checkpoint_file import read_checkpoint, record_of, write_checkpoint  # noqa: E402
from porting.export import ExportError, ExportResult, check_output, export_merged  # noqa: E402
from porting.keymap import STUDENT_TABLE  # noqa: E402
from porting.sam3_checkpoint import port_state_dict  # noqa: E402
from porting.torch_student import (  # noqa: E402
    load_efficient_sam3,
    save_efficient_sam3,
    torch_student_from_config,
    twin_state_dict,
)
from porting.upstream import build_tracker_predictor, track_with_masks  # noqa: E402

pytestmark = pytest.mark.parity

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE, NUM_FRAMES, VIDEO_SIZE = 224, 8, (90, 120)
# 16×16 memory: a 4×4 grid of 2-D latents over 3×3 windows (the memory resized 16 -> 12, as 72 -> 64)
# for the seed config, exact 4×4 windows for the EdgeTAM-like one.
REDUCED = {
    "efficient_memory": ["MODEL.PERCEIVER.NUM_LATENTS_2D", "16", "MODEL.PERCEIVER.WINDOW_SIZE", "3"],
    "edgetam_like": ["MODEL.PERCEIVER.NUM_LATENTS_2D", "16", "MODEL.PERCEIVER.WINDOW_SIZE", "4"],
}


def _config(name: str) -> config_lib.Config:
    overrides = [*REDUCED[name], "MODEL.TEACHER.IMAGE_SIZE", str(IMAGE_SIZE)]
    return config_lib.load(REPO / "configs" / f"{name}.yaml", overrides)


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w] + 0.5
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(seed, neck, sam3.pt path, trunk features [T, 16, 16, 1024], two mask prompts)."""
    seed = upstream.fresh_seed()
    neck = upstream.build_neck(seed)
    tracker = build_tracker_predictor(seed, image_size=IMAGE_SIZE)
    with torch.no_grad():
        # Objects present on every frame: a random score head may declare them absent, and then both
        # sides output the constant NO_OBJ_SCORE whatever the memory path computed.
        tracker.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0)
    model = upstream.sam3_checkpoint_dict(tracker, neck)
    # Detector keys the tracker never reads, in dtypes a float32 round trip would change.
    g = torch.Generator().manual_seed(seed)
    model["detector.transformer.probe.weight"] = torch.randn(5, 3, generator=g).to(torch.bfloat16)
    model["detector.backbone.language_backbone.probe"] = torch.arange(7, dtype=torch.int64)
    path = upstream.save_sam3_checkpoint(tmp_path_factory.mktemp("base") / "sam3.pt", model)
    grid = IMAGE_SIZE // 14
    trunk = torch.randn(NUM_FRAMES, grid, grid, 1024, generator=g).numpy()
    h, w = VIDEO_SIZE
    masks = [_ellipse(h, w, 40, 45, 22, 30), _ellipse(h, w, 55, 80, 25, 28)]
    return seed, neck, path, trunk, masks


def _student(cfg: config_lib.Config, seed: int) -> dict:
    """Student parameters drawn at unit-ish scale in the twin (JAX's initialisers are near zero)."""
    twin = torch_student_from_config(cfg)
    upstream.randomize_(twin, seed)
    return port_state_dict(twin_state_dict(twin), table=STUDENT_TABLE).params


def _save(folder: Path, cfg: config_lib.Config, **parts) -> Path:
    """An es3 weights folder holding `parts` (tracker, student, trained, step, report)."""
    return weights.save(folder, weights.Weights(cfg, "test", "weights_folder", **parts))


def _read(path: Path) -> tuple[dict, dict | None]:
    """(the state dict, the es3 record) of a checkpoint file."""
    sd, extras = read_checkpoint(path)
    return sd, record_of(extras)


def _export(stage2_weights: Path, base_path: Path, output_path: Path) -> ExportResult:
    """What `es3 export` does with its arguments: check the output, read both inputs, merge."""
    output_path, fmt = check_output(output_path, base_path)
    stage2 = weights.load(stage2_weights, parts=(weights.STUDENT,))
    base = weights.load(base_path, stage2.cfg, parts=("tracker",))
    return export_merged(stage2, base, output_path, fmt=fmt)


def _weights_folder(folder: Path, base_path: Path, cfg: config_lib.Config, seed: int) -> tuple[Path, dict]:
    """What `es3 train` leaves in <run>/weights: the teacher it read, the student, the config."""
    tracker = weights.load(base_path, cfg, parts=("tracker",)).tracker
    student = _student(cfg, seed)
    _save(folder / "weights", cfg, tracker=tracker, student=student, step=3, report={"mode": "distill"})
    return folder, student


def _bytes(t) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# The seed's student in every run; the EdgeTAM-like one (another perceiver and pooling) in
# `make test-slow`, which keeps `make test` within its time.
@pytest.mark.parametrize("name", ["efficient_memory", pytest.param("edgetam_like", marks=pytest.mark.slow)])
def test_exported_tracker_tracks_as_the_jax_student(base, tmp_path, name):
    """PyTorch (upstream predictor + the exported student) vs JAX (`VideoPredictor` on the run):
    8 frames, 2 objects prompted by masks on frame 0, memory selection on, float32."""

    seed, neck, base_path, trunk, masks = base
    cfg = _config(name)
    run, _ = _weights_folder(tmp_path / "run", base_path, cfg, seed + 1)
    merged = _export(run / "weights", base_path, tmp_path / "efficient_sam3_full.pt").path

    model = load_efficient_sam3(merged, device="cpu")
    prompts = {1: (0, masks[0]), 2: (0, masks[1])}
    ref = track_with_masks(model, neck, trunk, VIDEO_SIZE, prompts, start_frame_idx=0)

    predictor = VideoPredictor.from_checkpoint(run)
    assert predictor.memory == "student"
    state = predictor.init_state(trunk, video_size=VIDEO_SIZE)
    for obj_id, (frame_idx, mask) in prompts.items():
        predictor.add_new_mask(state, frame_idx, obj_id, mask)
    ours = list(predictor.propagate_in_video(state, start_frame_idx=0))

    assert [f for f, _, _ in ours] == [f for f, _, _ in ref] == list(range(NUM_FRAMES))
    worst_err, worst_iou = 0.0, 1.0
    for (frame, ids, logits), (_, ref_ids, ref_logits) in zip(ours, ref, strict=True):
        assert ids == ref_ids == [1, 2]
        if frame > 0:
            assert np.abs(ref_logits).max() < 1000  # tracked, not NO_OBJ_SCORE
        err = upstream.report(
            f"export {name}: frame {frame} mask logits, torch vs JAX", logits, ref_logits, 1e-3
        )
        worst_err = max(worst_err, err)
        for k in range(2):
            worst_iou = min(worst_iou, upstream.mask_iou(logits[k], ref_logits[k], 1e-3))
    print(f"[parity] export {name}: worst relative error {worst_err:.3e}")
    upstream.report_iou(f"export {name}: worst binarised-mask IoU over frames and objects", worst_iou, 0.999)


def test_round_trip_es3_torch_es3_is_bit_identical(base, tmp_path):
    """es3 weights -> merged .pt -> PyTorch model -> saved from PyTorch (.safetensors) -> `es3 port`
    -> es3 weights: the student's parameters come back bit for bit, and the predictor reads the
    merged file directly too."""

    seed, _, base_path, _, _ = base
    cfg = _config("efficient_memory")
    run, student = _weights_folder(tmp_path / "run", base_path, cfg, seed + 2)
    merged = tmp_path / "merged.pt"
    assert main(["export", "--stage2_weights", str(run / "weights"), "--sam3_weights", str(base_path), "--output_path", str(merged)]) == 0  # fmt: skip
    model = load_efficient_sam3(merged, device="cpu")
    edited = save_efficient_sam3(model, tmp_path / "from_torch.safetensors")
    assert main(["port", "--sam3_weights", str(edited), "--output_dir", str(tmp_path / "back")]) == 0

    back = weights.load(tmp_path / "back")
    params, back_cfg = {**back.tracker, "student": back.student}, back.cfg
    assert back_cfg.MODEL.PERCEIVER == cfg.MODEL.PERCEIVER
    assert back_cfg.MODEL.MEMORY_ATTENTION == cfg.MODEL.MEMORY_ATTENTION
    assert back_cfg.MODEL.TEACHER == cfg.MODEL.TEACHER
    want, got = flatten(student), flatten(params["student"])
    assert sorted(got) == sorted(want)
    for path, value in want.items():
        assert np.asarray(got[path]).tobytes() == np.asarray(value).tobytes(), path

    for source in (tmp_path / "back", merged):
        predictor = VideoPredictor.from_checkpoint(source)

        loaded = flatten(nnx.to_pure_dict(nnx.state(predictor.engine.memory_path())))
        for path, value in want.items():
            assert np.asarray(loaded[path]).tobytes() == np.asarray(value).tobytes(), (source, path)


def test_training_checkpoint_and_config_mismatch(base, tmp_path):
    """A checkpoint ref (`<run>/ckpt_best`) exports with the run's config.yaml; a config.yaml that
    does not describe the checkpoint is refused, naming the key and both shapes."""

    seed, _, base_path, _, _ = base
    cfg = _config("efficient_memory")
    student = _student(cfg, seed + 3)
    run = tmp_path / "run"
    mgr = checkpoints.manager(run)
    meta = {"mode": "distill", "config": config_lib.to_dict(cfg)}
    opt = {"count": np.zeros((), np.int32)}
    checkpoints.save(
        mgr,
        4,
        params=student,
        opt_state=opt,
        data_state={"micro_step": 4},
        meta=meta,
        metrics={"val_jf": 0.7},
    )
    checkpoints.save(
        mgr,
        8,
        params=student,
        opt_state=opt,
        data_state={"micro_step": 8},
        meta=meta,
        metrics={"val_jf": 0.1},
    )
    config_lib.save(cfg, run / "config.yaml")

    result = _export(run / "ckpt_best.pth", base_path, tmp_path / "best.safetensors")
    assert result.format == "safetensors" and result.record["source"]["step"] == 4
    sd, record = _read(result.path)
    assert record == result.record
    assert (
        upstream.to_numpy(sd["tracker.spatial_perceiver.latents"]).tobytes()
        == np.asarray(student["spatial_perceiver"]["latents"]).tobytes()
    )

    wrong = config_lib.apply_overrides(cfg, ["MODEL.PERCEIVER.NUM_LATENTS", "32"])
    config_lib.save(wrong, run / "config.yaml")
    with pytest.raises(ParamMismatchError) as e:
        _export(run / "ckpt_latest", base_path, tmp_path / "latest.pt")
    message = str(e.value)
    print(f"[refused] {message}")
    assert "spatial_perceiver.latents (tracker.spatial_perceiver.latents)" in message
    assert "shape (256, 64), expected (32, 64)" in message
    assert not (tmp_path / "latest.pt").exists()


def test_base_keys_come_through_byte_identical(base, tmp_path):
    """Every base key except the teacher's memory attention is kept with its bytes and dtype; a trunk
    es3 does not know, in half precision, included (a real stage-1 trunk: test_stage1_checkpoint)."""
    seed, _, base_path, _, _ = base
    sd, _ = _read(base_path)
    g = torch.Generator().manual_seed(seed)
    trunk = {
        "detector.backbone.vision_backbone.trunk.stem.0.weight": torch.randn(16, 3, 3, 3, generator=g).half(),
        "detector.backbone.vision_backbone.trunk.stages.0.norm.running_mean": torch.randn(16, generator=g),
        "detector.backbone.vision_backbone.trunk.stages.0.norm.num_batches_tracked": torch.tensor(1234),
    }
    stage1 = tmp_path / "other_trunk.pt"
    upstream.save_sam3_checkpoint(stage1, {**sd, **trunk})
    cfg = _config("edgetam_like")
    run, _ = _weights_folder(tmp_path / "run", base_path, cfg, seed + 4)
    merged = _export(run / "weights", stage1, tmp_path / "full.pt").path

    out, record = _read(merged)
    assert record["memory"] == "student" and record["MODEL"]["PERCEIVER"]["NUM_LATENTS_2D"] == 16
    original, _ = _read(stage1)
    kept = [k for k in original if not k.startswith("tracker.transformer.encoder.")]
    for key in kept:
        assert out[key].dtype == original[key].dtype, key
        assert _bytes(out[key]) == _bytes(original[key]), key
    assert all(k in out for k in trunk)
    encoder = {k for k in out if k.startswith("tracker.transformer.encoder.layers.")}
    assert {int(k.split(".")[4]) for k in encoder} == {0, 1}  # the student's 2 layers, not the teacher's 4
    assert any(k.startswith("tracker.spatial_perceiver.") for k in out)
    print(f"[export] base: {len(kept)} keys byte-identical ({len(trunk)} of a foreign trunk)")


def test_missing_or_extra_key_is_refused_naming_it(base, tmp_path):
    seed, _, base_path, _, _ = base
    cfg = _config("efficient_memory")
    run, _ = _weights_folder(tmp_path / "run", base_path, cfg, seed + 5)
    merged = _export(run / "weights", base_path, tmp_path / "merged.pt").path
    sd, record = _read(merged)

    missing_key = "tracker.transformer.encoder.layers.1.norm2.weight"
    missing = {k: v for k, v in sd.items() if k != missing_key}
    torch.save({"model": missing, "es3_config": record}, tmp_path / "missing.pt")
    with pytest.raises(ParamMismatchError, match=re.escape(f"missing key: {missing_key}")):
        load_efficient_sam3(tmp_path / "missing.pt", device="cpu")

    extra_key = "tracker.spatial_perceiver.layers.0.attn.to_pos.weight"
    torch.save({"model": {**sd, extra_key: torch.zeros(64, 64)}, "es3_config": record}, tmp_path / "extra.pt")
    with pytest.raises(ParamMismatchError, match=re.escape(f"unexpected key: {extra_key}")):
        load_efficient_sam3(tmp_path / "extra.pt", device="cpu")
    with pytest.raises(ParamMismatchError, match=re.escape(extra_key)):
        weights.load(tmp_path / "extra.pt")


def test_refusals_base_without_tracker_and_interrupted_write(base, tmp_path, monkeypatch):
    seed, _, base_path, _, _ = base
    cfg = _config("efficient_memory")
    run, _ = _weights_folder(tmp_path / "run", base_path, cfg, seed + 6)
    sd, _ = _read(base_path)
    detector_only = upstream.save_sam3_checkpoint(
        tmp_path / "detector.pt", {k: v for k, v in sd.items() if not k.startswith("tracker.")}
    )
    with pytest.raises(weights.WeightsError, match=r"no tracker\.\* keys"):
        _export(run / "weights", detector_only, tmp_path / "out.pt")

    out = tmp_path / "out" / "efficient_sam3_full.pt"
    out.parent.mkdir()

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        _export(run / "weights", base_path, out)
    assert list(out.parent.iterdir()) == []
    monkeypatch.undo()

    _export(run / "weights", base_path, out)
    with pytest.raises(ExportError, match="already exists"):
        _export(run / "weights", base_path, out)
    with pytest.raises(ExportError, match="holds no student"):
        plain = tmp_path / "plain"
        _save(plain, cfg, tracker={"neck": {}})
        _export(plain, base_path, tmp_path / "plain.pt")


def test_base_of_another_model_is_refused_naming_each_key(base, tmp_path, capsys):
    """A tiny-config run exported into a SAM3-shaped base (`es3 port` of sam3.pt, whose tracker
    is not checked against the run's config when it is read): refused before anything is written,
    naming the keys and both shapes, instead of a file `es3 port` then refuses."""
    seed, _, base_path, _, _ = base
    sam3 = weights.save(
        tmp_path / "sam3", weights.load(base_path, _config("efficient_memory"), parts=("tracker",))
    )
    tiny = config_lib.load(REPO / "configs" / "tiny.yaml")
    _save(tmp_path / "run", tiny, student=_student(tiny, seed + 7))
    out = tmp_path / "merged.pt"
    argv = [
        "export",
        "--stage2_weights",
        str(tmp_path / "run"),
        "--sam3_weights",
        str(sam3),
        "--output_path",
        str(out),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    print(f"[refused] {err}")
    assert f"es3 export: error: {sam3}: the base does not fit the model of the run" in err
    assert (
        "detector.backbone.vision_backbone.sam2_convs.2.conv_1x1.weight: shape (256, 1024, 1, 1), "
        "expected (256, 64, 1, 1)"
    ) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "sam3"]


def test_unwritable_output_is_refused_before_the_work(tmp_path, capsys):
    """The output is checked first: its inputs here do not even exist."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    missing = str(tmp_path / "absent")
    export = [
        "export",
        "--stage2_weights",
        missing,
        "--sam3_weights",
        missing,
        "--output_path",
        str(blocker / "m.pt"),
    ]
    assert main(export) == 2
    assert f"es3 export: error: cannot write {blocker / 'm.pt'}: Not a directory" in capsys.readouterr().err
    assert main(["port", "--sam3_weights", missing, "--output_dir", str(blocker / "ported")]) == 2
    assert f"es3 port: error: cannot write {blocker / 'ported'}: Not a directory" in capsys.readouterr().err


# write_checkpoint where no file may grow past 100 kB: writing past it fails with EFBIG as writing
# to a full disk fails with ENOSPC (torch's zip writer turns either into a RuntimeError).
_SMALL_FILES = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
import torch
from es3_jax.errors import Es3Error
from porting.checkpoint_file import write_checkpoint
for fmt in ("pt", "safetensors"):
    try:
        write_checkpoint(f"{sys.argv[1]}/merged.{fmt}", {"x": torch.zeros(100_000)}, {}, fmt)
    except Es3Error as e:
        print(f"{type(e).__name__}: {e}")
"""


def test_a_failed_write_names_the_output_and_leaves_nothing(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", _SMALL_FILES, str(tmp_path)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    for fmt in ("pt", "safetensors"):
        assert f"OutputError: cannot write {tmp_path / f'merged.{fmt}'}: File too large" in run.stdout, (
            run.stdout
        )
    assert list(tmp_path.iterdir()) == []


def test_outputs_get_the_umask_permissions_and_stale_temporaries_go(tmp_path):
    """Temporaries an interrupted write left (tempfile's names, as before) are removed by the next
    write of the same target; one still being written (locked), and anything else, are kept."""
    stale = [tmp_path / ".merged.pt.k2jitgy3.tmp", tmp_path / ".weights.n6nd1jc_"]
    (stale[1] / "params.orbax-checkpoint-tmp").mkdir(parents=True)
    (stale[1] / "config.yaml").write_text("")
    kept = [tmp_path / n for n in (".merged.pt.0a1b2c3d.tmp", ".merged.pt.bak", ".merged.pt.k2jitgy3.tmp.1",
                                   ".other.pt.k2jitgy3.tmp", ".weights.backup01")]  # fmt: skip
    (kept[-1]).mkdir()
    (kept[-1] / "notes.txt").write_text("mine")
    for path in [stale[0], *kept[:-1]]:
        path.write_bytes(b"x")
    live = os.open(kept[0], os.O_RDONLY)  # a write in progress holds its temporary locked
    fcntl.flock(live, fcntl.LOCK_EX)
    umask = os.umask(0o027)
    try:
        merged = write_checkpoint(tmp_path / "merged.pt", {"x": torch.zeros(2)}, {}, "pt")
        folder = _save(tmp_path / "weights", _config("efficient_memory"), tracker={"neck": {}})
    finally:
        os.umask(umask)
        os.close(live)
    assert stat.S_IMODE(merged.stat().st_mode) == 0o640
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def _readme_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## PyTorch", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README's PyTorch section has no python block"
    return blocks[0]


def test_readme_pytorch_snippet_runs_as_written(tmp_path, monkeypatch):
    """The README's PyTorch lines, exec'd as they are in a folder holding a small exported model
    (112 px, a 1-block 64-wide SAM3 ViT in the file), 3 JPEG frames and a palette mask."""
    from PIL import Image
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine

    from porting.upstream import randomize_, tracker_predictor, vit_trunk

    small = [
        "MODEL.TEACHER.IMAGE_SIZE", "112", "MODEL.TEACHER.TRUNK_DIM", "64", "MODEL.TRUNK.WIDTH", "64",
        "MODEL.TRUNK.NUM_HEADS", "2", "MODEL.TRUNK.MLP_DIM", "128", "MODEL.TRUNK.DEPTH", "1",
        "MODEL.TRUNK.GLOBAL_BLOCKS", "[0]", "MODEL.TRUNK.WINDOW_SIZE", "8", "MODEL.TRUNK.PRETRAIN_IMAGE_SIZE", "112",
        "MODEL.PERCEIVER.NUM_LATENTS", "32", "MODEL.PERCEIVER.NUM_LATENTS_2D", "16", "MODEL.PERCEIVER.WINDOW_SIZE", "2",
    ]  # fmt: skip
    cfg = config_lib.load(REPO / "configs" / "efficient_memory.yaml", small)
    seed = upstream.fresh_seed()
    trunk = vit_trunk(
        depth=1, img_size=112, global_blocks=(0,), window_size=8, embed_dim=64, num_heads=2, mlp_dim=128,
        pretrain_img_size=112,
    )  # fmt: skip
    neck = Sam3DualViTDetNeck(
        trunk=trunk, position_encoding=PositionEmbeddingSine(256), d_model=256, scale_factors=[4.0, 2.0, 1.0, 0.5],
        add_sam2_neck=True,
    )  # fmt: skip
    randomize_(neck, seed)
    tracker = tracker_predictor(image_size=112)
    randomize_(tracker, seed + 1)
    model = upstream.sam3_checkpoint_dict(tracker)
    model.update({f"detector.backbone.vision_backbone.{k}": v for k, v in neck.state_dict().items()})
    base_path = upstream.save_sam3_checkpoint(tmp_path / "sam3.pt", model)
    _save(tmp_path / "run" / "weights", cfg, student=_student(cfg, seed + 2))
    _export(tmp_path / "run" / "weights", base_path, tmp_path / "output" / "efficient_sam3_full.pt")

    rng = np.random.default_rng(seed)
    (tmp_path / "video_frames").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), np.uint8)).save(
            tmp_path / "video_frames" / f"{i:05d}.jpg"
        )
    Image.fromarray(_ellipse(60, 80, 30, 40, 15, 20).astype(np.uint8)).save(tmp_path / "first_frame_mask.png")

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_readme_block(), "README.md (PyTorch)", "exec"), namespace)
    predictor = namespace["predictor"]
    assert predictor.backbone is not None and predictor.spatial_perceiver is not None
    assert namespace["frame_idx"] == 2 and namespace["masks"].shape == (1, 60, 80)


def test_export_cli_help_lists_the_seed_flags():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["export"]
    flags = {opt for a in sub._actions for opt in a.option_strings}
    assert {"--stage2_weights", "--sam3_weights", "--output_path", "--format"} <= flags


def test_dataclass_sections_are_recorded():
    """The record carries every field of the model sections a PyTorch loader needs."""
    from porting.checkpoint_file import RECORDED_SECTIONS, config_record, record_config

    cfg = _config("efficient_memory")
    record = config_record(cfg, "student", {})
    assert set(record["MODEL"]) == set(RECORDED_SECTIONS)
    back = record_config(record)
    for section in RECORDED_SECTIONS:
        assert dataclasses.asdict(getattr(back.MODEL, section)) == dataclasses.asdict(
            getattr(cfg.MODEL, section)
        )


def test_finetuned_tracker_modules_replace_the_base(base, tmp_path):
    """A `TRAIN.MODE finetune` weights folder: its trained modules replace the base's keys (in the
    torch layout), the untrained ones are not written, and the file loads and ports as a teacher.
    The base may also be an es3 weights folder (the demo's teacher exists only in es3)."""
    _, _, base_path, _, _ = base
    cfg = config_lib.apply_overrides(_config("efficient_memory"), ["TRAIN.MODE", "finetune"])
    params = weights.load(base_path, cfg).tracker
    params["mask_decoder"]["iou_token"] = params["mask_decoder"]["iou_token"] + 1.0
    conv = params["memory_encoder"]["out_proj"]["kernel"]  # [kh, kw, I, O] <- torch [O, I, kh, kw]
    params["memory_encoder"]["out_proj"]["kernel"] = conv * 2.0
    params["prompt_encoder"]["no_mask_embed"] = params["prompt_encoder"]["no_mask_embed"] * 0.0  # not trained
    trained = {k: params[k] for k in cfg.TRAIN.FINETUNE_MODULES}
    _save(tmp_path / "ft", cfg, tracker=params, trained=trained, report={"mode": "finetune"})

    for i, base_file in enumerate((base_path, tmp_path / "ft")):
        merged = _export(tmp_path / "ft", base_file, tmp_path / f"ft{i}.pt")
        assert merged.record["memory"] == "teacher"
        assert len(merged.summary.replaced) > 0 and not merged.summary.added
        out, _ = _read(merged.path)
        original, _ = _read(base_path)
        iou = upstream.to_numpy(out["tracker.sam_mask_decoder.iou_token.weight"])
        np.testing.assert_array_equal(
            iou, upstream.to_numpy(original["tracker.sam_mask_decoder.iou_token.weight"]) + 1.0
        )
        kernel = upstream.to_numpy(out["tracker.maskmem_backbone.out_proj.weight"])
        np.testing.assert_array_equal(kernel, np.transpose(conv, (3, 2, 0, 1)) * 2.0)
        no_mask = upstream.to_numpy(out["tracker.sam_prompt_encoder.no_mask_embed.weight"])
        if base_file == base_path:
            assert np.abs(no_mask).max() > 0  # the base's, not the folder's copy of an untrained module
        load_efficient_sam3(merged.path, device="cpu")  # strict, teacher memory path
        ported = weights.load(merged.path)
        assert ported.kind == "merged_export" and ported.report["memory"] == "teacher"
        np.testing.assert_array_equal(
            ported.tracker["mask_decoder"]["iou_token"], params["mask_decoder"]["iou_token"]
        )
