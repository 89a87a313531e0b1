"""`es3_jax.weights`: every command reads a weights file once, and what can be a teacher.

The PyTorch files are written from es3's own random weights through the key tables (a small
geometry: 112 px frames, a 1-block 64-wide ViT), so these tests need torch but not sam3.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from es3_jax import config as config_lib
from es3_jax import weights
from es3_jax.cli import main
from es3_jax.data.synthetic import make_synthetic
from es3_jax.models.student import student_from_config
from es3_jax.models.tracker import SAM3Tracker
from es3_jax.models.trunk import trunk_from_config
from es3_jax.params import flatten, param_dict
from es3_jax.predictor import VideoPredictor
from tests.predictor.test_video_predictor import SMALL as PREDICTOR_SMALL

torch = pytest.importorskip("torch")
from porting import checkpoint_file  # noqa: E402
from porting.keymap import TRACKER_TABLE, TRUNK_TABLE  # noqa: E402
from porting.sam3_checkpoint import TRUNK_PREFIX  # noqa: E402
from porting.stage1_checkpoint import stage1_trunk_to_torch  # noqa: E402

# The predictor tests' 112 px geometry, with a student small enough for it.
SMALL = [*PREDICTOR_SMALL, "MODEL.PERCEIVER.NUM_LATENTS", "8", "MODEL.PERCEIVER.NUM_LATENTS_2D", "4",
         "MODEL.PERCEIVER.WINDOW_SIZE", "2"]  # fmt: skip


def _torch(params: dict, table) -> dict:
    out = {}
    for path, value in flatten(params).items():
        key, transform = table.to_torch(path)
        out[key] = torch.from_numpy(transform.to_torch(np.array(value, np.float32)))
    return out


@pytest.fixture(scope="module")
def sam3_pt(tmp_path_factory) -> tuple[Path, config_lib.Config]:
    """A sam3.pt-layout file of random weights at the small geometry: tracker, neck, ViT trunk."""
    cfg = config_lib.load(None, SMALL)
    model = _torch(param_dict(SAM3Tracker(cfg.MODEL.TEACHER, rngs=nnx.Rngs(1))), TRACKER_TABLE)
    model.update(_torch({"trunk": param_dict(trunk_from_config(cfg, seed=2))}, TRUNK_TABLE))
    model["tracker.no_mem_pos_enc"] = torch.zeros(1, 1, 256)  # held by upstream, never read
    path = tmp_path_factory.mktemp("sam3") / "sam3.pt"
    torch.save({"model": model}, path)
    return path, cfg


@pytest.fixture
def reads(monkeypatch) -> Counter:
    """How often each file is opened by torch.load or safetensors."""
    counts: Counter = Counter()
    load, safe_open = torch.load, checkpoint_file.safe_open

    def counted_load(f, *args, **kwargs):
        counts[Path(f).name] += 1
        return load(f, *args, **kwargs)

    def counted_open(f, *args, **kwargs):
        counts[Path(f).name] += 1
        return safe_open(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted_load)
    monkeypatch.setattr(checkpoint_file, "safe_open", counted_open)
    return counts


def test_every_command_reads_a_checkpoint_once(sam3_pt, tmp_path, reads, capsys):
    path, cfg = sam3_pt
    assert main(["port", "--sam3_weights", str(path), "--output_dir", str(tmp_path / "port"), *SMALL]) == 0
    assert reads == {"sam3.pt": 1}, f"es3 port: {reads}"
    assert weights.load(tmp_path / "port").trunk is not None  # the ViT came along

    reads.clear()
    make_synthetic(tmp_path / "data", 1, num_frames=2, height=48, width=64)
    embed = [
        "embed",
        "--data_dir",
        str(tmp_path / "data"),
        "--output_dir",
        str(tmp_path / "emb"),
        "--no_progress",
    ]
    assert main([*embed, "--sam3_weights", str(path), *SMALL]) == 0
    assert reads == {"sam3.pt": 1}, f"es3 embed: {reads}"

    # A merged export of a student: export reads the base once; tracking from it reads it once.
    run = weights.Weights(cfg, "es3 train", "weights_folder", student=param_dict(student_from_config(cfg)))
    weights.save(tmp_path / "run" / "weights", run)
    reads.clear()
    out = tmp_path / "merged.pt"
    assert main(["export", "--stage2_weights", str(tmp_path / "run"), "--sam3_weights", str(path),
                 "--output_path", str(out)]) == 0  # fmt: skip
    assert reads == {"sam3.pt": 1}, f"es3 export: {reads}"
    for source in (path, out):
        reads.clear()
        VideoPredictor.from_checkpoint(source, config=cfg if source == path else None)
        assert reads == {source.name: 1}, f"VideoPredictor.from_checkpoint({source.name}): {reads}"


def test_what_can_be_the_teacher(sam3_pt, tmp_path):
    """MODEL.TEACHER_WEIGHTS: a fine-tuned teacher's weights folder and the export of a fine-tuning run
    (its memory path is the tracker's own) are teachers; a merged export of a student is refused,
    naming what it lacks."""
    path, cfg = sam3_pt
    base = weights.load(path, cfg)
    finetuned = {**base.tracker, "mask_decoder": {**base.tracker["mask_decoder"]}}
    finetuned["mask_decoder"]["iou_token"] = finetuned["mask_decoder"]["iou_token"] + 1.0
    ft_cfg = config_lib.override(cfg, "TRAIN.MODE", "finetune")
    folder = tmp_path / "ft" / "weights"
    weights.save(
        folder,
        weights.Weights(
            ft_cfg, "es3 train", "weights_folder", tracker=finetuned, trunk=base.trunk,
            trained={k: finetuned[k] for k in ft_cfg.TRAIN.FINETUNE_MODULES},
        ),
    )  # fmt: skip
    assert main(["export", "--stage2_weights", str(folder), "--sam3_weights", str(path),
                 "--output_path", str(tmp_path / "ft.pt")]) == 0  # fmt: skip
    for source in (folder, tmp_path / "ft.pt"):
        teacher = weights.teacher(config_lib.override(cfg, "MODEL.TEACHER_WEIGHTS", str(source)), trunk=True)
        np.testing.assert_array_equal(
            teacher.tracker["mask_decoder"]["iou_token"],
            finetuned["mask_decoder"]["iou_token"],
            err_msg=str(source),
        )
        assert teacher.trunk is not None

    run = weights.Weights(cfg, "es3 train", "weights_folder", student=param_dict(student_from_config(cfg)))
    weights.save(tmp_path / "st" / "weights", run)
    assert main(["export", "--stage2_weights", str(tmp_path / "st"), "--sam3_weights", str(path),
                 "--output_path", str(tmp_path / "st.pt")]) == 0  # fmt: skip
    refused = config_lib.override(cfg, "MODEL.TEACHER_WEIGHTS", str(tmp_path / "st.pt"))
    with pytest.raises(
        weights.WeightsError, match=r"st\.pt: a merged export whose memory path is a distilled student"
    ):
        weights.teacher(refused, trunk=False)


def test_unknown_sources_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(weights.WeightsError, match="empty: not a weights source"):
        weights.load(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(weights.WeightsError, match=r"notes\.txt: unknown weights file"):
        weights.load(tmp_path / "notes.txt")
    with pytest.raises(weights.WeightsError, match="checkpoint not found"):
        weights.load(tmp_path / "missing.pt")


# Keys of a part es3 does not use, beside the parts it ports.
TEXT_ENCODER = {f"detector.backbone.language_backbone.encoder.{i}.weight": torch.zeros(2) for i in range(3)}


def _tracker_file(path: Path, cfg: config_lib.Config, trunk: dict) -> Path:
    """A sam3.pt-layout file: the tracker and neck of `cfg` (random), `trunk`, and `TEXT_ENCODER`."""
    model = _torch(param_dict(SAM3Tracker(cfg.MODEL.TEACHER, rngs=nnx.Rngs(1))), TRACKER_TABLE)
    model["tracker.no_mem_pos_enc"] = torch.zeros(1, 1, 256)
    torch.save({"model": {**model, **trunk, **TEXT_ENCODER}}, path)
    return path


def _port(path: Path, tmp_path: Path, capsys, overrides: list[str]) -> tuple[str, dict]:
    """(what `es3 port` of `path` prints, the report it writes beside the weights)."""
    capsys.readouterr()
    out_dir = tmp_path / "port"
    assert main(["port", "--sam3_weights", str(path), "--output_dir", str(out_dir), *overrides]) == 0
    return capsys.readouterr().out, json.loads((out_dir / weights.REPORT_FILE).read_text())


def test_port_of_a_stage1_checkpoint_lists_only_the_keys_it_did_not_use(tmp_path, capsys):
    kind = "repvit_m0_9"
    cfg = config_lib.load(None, [*SMALL, "MODEL.TRUNK.KIND", kind])
    params = param_dict(trunk_from_config(cfg, seed=2))
    trunk = {
        k: torch.from_numpy(np.array(v))
        for k, v in stage1_trunk_to_torch(kind, params, cfg.MODEL.TEACHER.TRUNK_DIM).items()
    }
    # BatchNorm's step counters, which every stage-1 file holds and the port skips.
    trunk.update(
        {
            k.replace(".running_mean", ".num_batches_tracked"): torch.tensor(0)
            for k in trunk
            if k.endswith(".running_mean")
        }
    )
    path = _tracker_file(tmp_path / "stage1.pt", config_lib.load(None, SMALL), trunk)
    out, report = _port(path, tmp_path, capsys, SMALL)
    assert f"trunk: stage-1 {kind} trunk (ported" in out
    assert report["trunk"] == kind and report["unused_keys"] == {"text encoder": 3}
    assert "unused: 3 keys of the text encoder" in out and "keys of the trunk" not in out, out


def test_port_of_a_cut_sam3_checkpoint_lists_only_the_keys_it_did_not_use(tmp_path, capsys):
    overrides = [*SMALL, "MODEL.TRUNK.DEPTH", "3", "MODEL.TRUNK.GLOBAL_BLOCKS", "[2]"]
    cfg = config_lib.load(None, overrides)
    trunk = _torch({"trunk": param_dict(trunk_from_config(cfg, seed=2))}, TRUNK_TABLE)
    # The RoPE tables sam3.pt keeps in every block, which the port recomputes.
    trunk.update(
        {
            f"{TRUNK_PREFIX}blocks.{i}.attn.freqs_cis": torch.zeros(4, 2, dtype=torch.complex64)
            for i in range(3)
        }
    )
    path = _tracker_file(tmp_path / "sam3_3_blocks.pt", cfg, trunk)
    out, report = _port(path, tmp_path, capsys, overrides)
    assert "trunk: SAM3 ViT trunk (ported" in out
    assert report["trunk"] == "sam3_vit" and report["unused_keys"] == {"text encoder": 3}
    assert "unused: 3 keys of the text encoder" in out and "keys of the trunk" not in out, out
