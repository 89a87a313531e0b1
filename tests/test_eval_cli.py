"""`es3 eval`: scoring existing predictions, and the whole protocol with the tracker on real frames."""

import json
from pathlib import Path

import numpy as np
import pytest

from es3_jax.cli import main
from es3_jax.data.masks import read_palette_png, write_palette_png
from es3_jax.predictor import VideoPredictor
from tests.eval.test_vos import OraclePredictor, _make_dataset

JF_REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "jf_reference"

# A small model of the SAM3 geometry's shape (8x8 tokens), random weights: fast on CPU.
TINY = [
    *("MODEL.TEACHER.IMAGE_SIZE", "112", "MODEL.TEACHER.TRUNK_DIM", "64", "MODEL.TRUNK.WIDTH", "64"),
    *("MODEL.TRUNK.DEPTH", "2", "MODEL.TRUNK.NUM_HEADS", "2", "MODEL.TRUNK.MLP_DIM", "128"),
    *(
        "MODEL.TRUNK.WINDOW_SIZE",
        "4",
        "MODEL.TRUNK.GLOBAL_BLOCKS",
        "[1]",
        "MODEL.TRUNK.PRETRAIN_IMAGE_SIZE",
        "56",
    ),
    *("MODEL.TEACHER.MEMORY_ATTENTION_LAYERS", "1"),
]


@pytest.fixture(scope="module")
def fixture_dir():
    if not JF_REFERENCE.is_dir():
        pytest.skip(f"fixture missing: {JF_REFERENCE}")
    return JF_REFERENCE


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in ("--dataset", "--data_root", "--checkpoint", "--output_dir", "--score_only", "--pred_root",
                 "--gt_root", "--layout", "summary.json", "davis2017-evaluation", "sav_benchmark"):  # fmt: skip
        assert word in out


def test_score_only_reproduces_the_official_summary(fixture_dir, tmp_path, capsys):
    args = ["eval", "--score_only", "--layout", "davis", "--output_dir", str(tmp_path)]
    args += [
        "--pred_root",
        str(fixture_dir / "pred_osvos"),
        "--gt_root",
        str(fixture_dir / "gt_davis2017fmt_derived"),
    ]
    assert main(args) == 0
    assert "J&F 0.8559" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    expected = json.loads((fixture_dir / "reference" / "summary_full_precision.json").read_text())
    assert abs(summary["J&F"] - expected["global_mean_over_objects"]["JF_mean"]) <= 1e-12
    reference = fixture_dir / "reference" / "davis2017-evaluation_global_results-val.csv"
    assert (tmp_path / "global_results.csv").read_text() == reference.read_text()


def test_score_only_errors_exit_2(fixture_dir, tmp_path, capsys):
    assert main(["eval", "--score_only", "--output_dir", str(tmp_path)]) == 2
    assert "--pred_root" in capsys.readouterr().err
    args = ["eval", "--score_only", "--layout", "davis", "--output_dir", str(tmp_path)]
    args += ["--pred_root", str(tmp_path / "none"), "--gt_root", str(fixture_dir / "gt_davis2017fmt_derived")]
    assert main(args) == 2
    assert "none" in capsys.readouterr().err


def test_tracker_end_to_end_on_car_shadow(fixture_dir, tmp_path, capsys):
    """Random weights (the score is meaningless): the run completes, writes the DAVIS layout and scores it."""
    root = tmp_path / "DAVIS"
    n = 8
    for src, dst, ext in (
        ("JPEGImages_480p", "JPEGImages", "jpg"),
        ("gt_davis2017fmt_derived", "Annotations", "png"),
    ):
        folder = root / dst / "480p" / "car-shadow"
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"{i:05d}.{ext}").symlink_to(
                (fixture_dir / src / "car-shadow" / f"{i:05d}.{ext}").resolve()
            )
    out = tmp_path / "out"
    args = ["eval", "--dataset", "davis", "--data_root", str(root), "--output_dir", str(out), *TINY]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "frames/s" in text and "random weights" in text
    written = sorted((out / "predictions" / "car-shadow").glob("*.png"))
    assert [p.stem for p in written] == [f"{i:05d}" for i in range(n)]
    assert read_palette_png(written[0]).shape == (480, 854)
    # Frame 0 returns the prompt itself.
    gt0 = read_palette_png(root / "Annotations" / "480p" / "car-shadow" / "00000.png")
    assert (read_palette_png(written[0]) == gt0).mean() > 0.99
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_objects"] == 1 and summary["frames"] == n and summary["fps"] > 0
    assert {"track_step", "write_masks"} <= set(summary["ms_per_frame"])
    assert 0.0 <= summary["J&F"] <= 1.0
    assert (out / "per-sequence_results.csv").read_text().startswith("Sequence,J-Mean,F-Mean\ncar-shadow_1,")


def _sav_root_with(tmp_path: Path, monkeypatch) -> tuple[Path, dict]:
    """A tiny SA-V root, and `es3 eval`'s predictor replaced by one that returns the ground truth."""
    truth = _make_dataset(tmp_path / "data", "sav")
    monkeypatch.setattr(VideoPredictor, "from_checkpoint", lambda *_, **__: OraclePredictor(truth, "sav"))
    return tmp_path / "data", truth


def test_eval_names_a_missing_jpeg_before_tracking(tmp_path, monkeypatch, capsys):
    root, _ = _sav_root_with(tmp_path, monkeypatch)
    (root / "JPEGImages_24fps" / "vid" / "00003.jpg").unlink()
    out = tmp_path / "out"
    assert main(["eval", "--dataset", "sav", "--data_root", str(root), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"vid: frame 00003 is annotated ({root / 'Annotations_6fps' / 'vid' / '000' / '00003.png'})" in err
    assert f"has no JPEG in {root / 'JPEGImages_24fps' / 'vid'}" in err and not out.exists()


def test_eval_leaves_out_an_object_empty_on_every_frame(tmp_path, monkeypatch, capsys):
    root, truth = _sav_root_with(tmp_path, monkeypatch)
    for t in range(len(truth)):
        write_palette_png(
            root / "Annotations_6fps" / "vid" / "002" / f"{t:05d}.png", np.zeros((32, 48), np.uint8)
        )
    out = tmp_path / "out"
    assert main(["eval", "--dataset", "sav", "--data_root", str(root), "--output_dir", str(out)]) == 0
    assert (
        "vid: objects 002 are empty on every annotated frame; not tracked or scored"
        in capsys.readouterr().err
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["num_objects"] == 2
        and summary["J&F"] == 1.0
        and summary["objects_not_scored"] == {"vid": ["002"]}
    )


def test_score_only_names_a_prediction_of_another_size(tmp_path, capsys):
    _make_dataset(tmp_path / "data", "davis")
    gt = tmp_path / "data" / "Annotations" / "480p"
    for png in sorted(gt.rglob("*.png")):
        write_palette_png(tmp_path / "pred" / png.relative_to(gt), read_palette_png(png))
    write_palette_png(tmp_path / "pred" / "vid" / "00002.png", np.zeros((16, 24), np.uint8))
    args = ["eval", "--score_only", "--layout", "davis", "--pred_root", str(tmp_path / "pred")]
    assert main([*args, "--gt_root", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        f"{tmp_path / 'pred' / 'vid' / '00002.png'} is 24x16 but {gt / 'vid' / '00002.png'} is 48x32" in err
    )
