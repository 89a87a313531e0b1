"""`es3 port`: sam3.pt, stage-1 merged and transformers checkpoints -> es3 weights, strictly."""

import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from es3_jax import weights
from es3_jax.cli import main
from es3_jax.models.neck import TrackerNeck
from es3_jax.params import bind, flatten
from porting.keymap import TRACKER_TABLE
from tests import upstream

torch = upstream.torch
from porting.sam3_checkpoint import sam3_to_transformers  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def upstream_parts():
    seed = upstream.fresh_seed()
    return upstream.build_tracker(seed), upstream.build_neck(seed)


@pytest.fixture(scope="module")
def sam3_model(upstream_parts):
    return upstream.sam3_checkpoint_dict(*upstream_parts)


def assert_params_equal_source(params, model):
    """Every ported parameter is its source tensor, transformed, bit for bit."""
    flat = flatten(params)
    for path, value in flat.items():
        key, transform = TRACKER_TABLE.to_torch(path)
        source = upstream.to_numpy(model[key])
        assert transform.to_torch(np.asarray(value)).tobytes() == source.tobytes(), path


def test_port_writes_weights_that_load_back_identical(tmp_path, sam3_model, capsys):
    ckpt = upstream.save_sam3_checkpoint(tmp_path / "sam3.pt", sam3_model)
    assert main(["port", "--sam3_weights", str(ckpt), "--output_dir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "ported: 326 tensors" in out and "22 keys of the detector neck" in out
    ported = weights.load(tmp_path / "w")
    assert ported.cfg.MODEL.TEACHER.grid == 72 and ported.trunk is None
    assert len(flatten(ported.tracker)) == 326
    assert_params_equal_source(ported.tracker, sam3_model)


def test_weights_load_without_torch(tmp_path, sam3_model):
    ckpt = upstream.save_sam3_checkpoint(tmp_path / "sam3.pt", sam3_model)
    assert main(["port", "--sam3_weights", str(ckpt), "--output_dir", str(tmp_path / "w")]) == 0
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        from es3_jax import weights
        from es3_jax.models.tracker import build_tracker
        ported = weights.load({str(tmp_path / "w")!r})
        tracker = build_tracker(ported.cfg.MODEL.TEACHER, ported.tracker)
        print("loaded", type(tracker).__name__)
        try:
            weights.load({str(ckpt)!r})
        except weights.WeightsError as e:
            print("refused:", e)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert "loaded SAM3Tracker" in run.stdout
    # A PyTorch file without torch: one error naming the file and the extra to install.
    assert (
        f"refused: {ckpt}: reading a PyTorch checkpoint needs torch: pip install 'es3-jax[torch]'"
        in run.stdout
    )


def test_bad_checkpoint_lists_every_problem_and_writes_nothing(tmp_path, sam3_model, capsys):
    model = dict(sam3_model)
    removed = "tracker.sam_mask_decoder.iou_token.weight"
    del model[removed]
    extra = "tracker.transformer.encoder.layers.0.extra_proj.weight"
    model[extra] = torch.zeros(3, 3)
    reshaped = "tracker.maskmem_backbone.out_proj.weight"
    model[reshaped] = torch.zeros(32, 256, 1, 1)
    ckpt = upstream.save_sam3_checkpoint(tmp_path / "bad.pt", model)
    out_dir = tmp_path / "w"
    assert main(["port", "--sam3_weights", str(ckpt), "--output_dir", str(out_dir)]) != 0
    err = capsys.readouterr().err
    assert f"missing key: {removed}" in err
    assert f"unexpected key: {extra}" in err
    assert f"shape mismatch: {reshaped}: shape (32, 256, 1, 1), expected (64, 256, 1, 1)" in err
    assert err.count("bad.pt") == 1, "one message for all three problems"
    assert not out_dir.exists()
    assert not list(tmp_path.glob(".w.*")), "no staging folder left behind"


def test_unknown_trunk_is_reported_foreign_and_the_tracker_ported(tmp_path, sam3_model, capsys):
    model = dict(sam3_model)
    model["detector.backbone.vision_backbone.trunk.model.stem.conv.weight"] = torch.randn(24, 3, 3, 3)
    model["detector.backbone.vision_backbone.trunk.model.stages.0.blocks.0.weight"] = torch.randn(24, 24)
    ckpt = upstream.save_sam3_checkpoint(tmp_path / "other_trunk.pt", model)
    result = weights.load(ckpt)
    assert result.kind == "sam3" and result.report["trunk"] == "unknown" and result.trunk is None
    assert result.report["unused_keys"]["trunk"] == 2
    assert_params_equal_source(result.tracker, sam3_model)
    assert main(["port", "--sam3_weights", str(ckpt), "--output_dir", str(tmp_path / "w")]) == 0
    assert "a trunk es3 does not know: not ported" in capsys.readouterr().out


def test_refuses_existing_output_and_unreadable_input(tmp_path, capsys):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "keep.txt").write_text("user data")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["port", "--sam3_weights", str(junk), "--output_dir", str(tmp_path / "x")]) == 2
    assert "junk.pt: not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert (
        main(["port", "--sam3_weights", str(tmp_path / "none.pt"), "--output_dir", str(tmp_path / "x")]) == 2
    )
    assert "checkpoint not found" in capsys.readouterr().err
    assert (tmp_path / "w" / "keep.txt").read_text() == "user data"


def test_transformers_layout_ports_to_the_same_params(tmp_path, sam3_model, upstream_parts):
    """The sam3 weights renamed into transformers' layout load strictly into the real
    `Sam3TrackerVideoModel`; its saved safetensors port to bit-identical es3 params, and the
    neck built from them matches upstream sam3."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    config = transformers.Sam3TrackerVideoConfig()
    config.vision_config.backbone_config.num_hidden_layers = 1  # the trunk is not part of this port
    config.vision_config.backbone_config.global_attn_indexes = [0]
    hf_model = transformers.Sam3TrackerVideoModel(config).eval()
    renamed = sam3_to_transformers({k: upstream.to_numpy(v) for k, v in sam3_model.items()})
    missing, unexpected = hf_model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in renamed.items()}, strict=False
    )
    assert not unexpected, unexpected
    assert all(k.startswith("vision_encoder.backbone.") for k in missing), missing
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))

    # The trunk of this model is cut to one block, so it is not read (parts: the tracker only).
    from_hf = weights.load(tmp_path / "model.safetensors", parts=("tracker",))
    from_pt = weights.load(upstream.save_sam3_checkpoint(tmp_path / "sam3.pt", sam3_model))
    unused = from_hf.report["unused_keys"]
    assert from_hf.kind == "transformers" and unused == {"trunk": unused["trunk"]}
    flat_hf, flat_pt = flatten(from_hf.tracker), flatten(from_pt.tracker)
    assert set(flat_hf) == set(flat_pt)
    for path in flat_pt:
        assert np.asarray(flat_hf[path]).tobytes() == np.asarray(flat_pt[path]).tobytes(), path

    neck = bind(lambda: TrackerNeck(rngs=nnx.Rngs(0)), from_hf.tracker["neck"], "transformers layout")
    x = torch.randn(1, 1024, 8, 8)
    ours, _ = neck(jnp.asarray(upstream.nchw_to_nhwc(x)))
    with torch.no_grad():
        for level in range(3):
            ref = upstream.nchw_to_nhwc(upstream_parts[1].sam2_convs[level](x))
            upstream.report(f"neck level {level} from the transformers layout", ours[level], ref, 1e-5)
