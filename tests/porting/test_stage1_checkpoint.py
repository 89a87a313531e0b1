"""Stage-1 merged checkpoints (a student trunk in sam3.pt's layout): read strictly, embedded with,
exported into and tracked with.

The checkpoint is made here the way EfficientSAM3's converter makes one: timm's RepViT-M1.1 with
every weight random, renamed into upstream's module names, under the merged trunk prefix with a
random stage-1 head, beside a tracker and neck (the tiny config's, random) in the sam3.pt layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from es3_jax import config as config_lib
from es3_jax import weights
from es3_jax.cli import main
from es3_jax.data.embedding_store import EmbeddingStore
from es3_jax.data.frames import load_frame_uint8, normalize
from es3_jax.data.masks import read_palette_png, write_palette_png
from es3_jax.errors import Es3Error
from es3_jax.models.student import student_from_config
from es3_jax.models.trunk import trunk_from_config
from es3_jax.params import param_dict
from tests import upstream
from tests.models.stage1 import timm_repvit
from tests.models.stage1.reference_head import random_head

torch = upstream.torch

from porting.export import es3_tracker_state_dict  # noqa: E402
from porting.stage1_checkpoint import (  # noqa: E402
    STAGE1_PREFIX,
    find_stage1_trunk,
    stage1_trunk_to_torch,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
BEDROOM = ROOT / ".." / "shared" / "fixtures" / "bedroom_frames"
KIND = "repvit_m1_1"
OUT_DIM = 64  # the tiny config's MODEL.TEACHER.TRUNK_DIM


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """(path, state dict) of a stage-1 merged checkpoint over the tiny tracker."""
    seed = upstream.fresh_seed()
    cfg = config_lib.load(TINY)
    sd = es3_tracker_state_dict(weights.load(None, cfg, seed=seed % 1000))
    backbone = timm_repvit.random_timm(KIND, seed)
    for k, v in timm_repvit.timm_to_upstream(backbone.state_dict()).items():
        sd[f"{STAGE1_PREFIX}backbone.model.{k}"] = v.detach().clone()
    for k, v in random_head(backbone.num_features, OUT_DIM, seed).state_dict().items():
        sd[f"{STAGE1_PREFIX}head.{k}"] = v.detach().clone()
    path = tmp_path_factory.mktemp("stage1") / "efficient_sam3_repvit_m1_1.pt"
    torch.save({"model": sd}, path)
    return path, sd


def test_loader_detects_the_trunk_and_the_key_table_runs_both_ways(stage1):
    path, sd = stage1
    loaded = weights.load(path, TINY)
    assert loaded.kind == "stage1" and loaded.cfg.MODEL.TRUNK.KIND == KIND
    assert loaded.report["trunk"] == KIND and f"stage-1 {KIND} trunk" in loaded.report["text"]
    # es3 -> torch through the same table gives back every trunk tensor, bit for bit.
    back = stage1_trunk_to_torch(KIND, loaded.trunk, OUT_DIM)
    source = {k: v for k, v in find_stage1_trunk(sd).items() if not k.endswith("num_batches_tracked")}
    assert set(back) == set(source)
    for key, value in back.items():
        np.testing.assert_array_equal(value, source[key].numpy(), err_msg=key)


@pytest.mark.parametrize("prefix", ["", "module.student_trunk.", "detector.backbone.vision_backbone.trunk."])
def test_older_layouts_are_found(stage1, prefix):
    _, sd = stage1
    older = {prefix + k.removeprefix(STAGE1_PREFIX): v for k, v in sd.items() if k.startswith(STAGE1_PREFIX)}
    found = find_stage1_trunk(older)
    assert set(found) == {k for k in sd if k.startswith(STAGE1_PREFIX)}


def test_port_names_every_bad_trunk_key_in_one_error(stage1, tmp_path, capsys):
    _, sd = stage1
    bad = dict(sd)
    missing = f"{STAGE1_PREFIX}backbone.model.features.5.token_mixer.0.conv.c.weight"
    extra = f"{STAGE1_PREFIX}backbone.model.features.5.token_mixer.0.extra.weight"
    reshaped = f"{STAGE1_PREFIX}head.3.bias"
    assert missing in bad and reshaped in bad
    del bad[missing]
    bad[extra] = torch.zeros(3)
    bad[reshaped] = torch.zeros(OUT_DIM + 1)
    torch.save({"model": bad}, tmp_path / "bad.pt")
    out = tmp_path / "w"
    assert main(["port", "--sam3_weights", str(tmp_path / "bad.pt"), "--output_dir", str(out),
                 "--config", str(TINY)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert f"missing key: {missing}" in err and f"unexpected key: {extra}" in err
    assert f"shape mismatch: {reshaped}: shape ({OUT_DIM + 1},), expected ({OUT_DIM},)" in err
    assert err.count("bad.pt") == 1, "one message for all three problems"
    assert not out.exists()


def test_half_present_trunk_is_one_error(stage1, tmp_path, capsys):
    _, sd = stage1
    # The checkpoint stops halfway through the backbone (and has no head).
    half = {k: v for k, v in sd.items() if not k.startswith(f"{STAGE1_PREFIX}head.")}
    half = {k: v for k, v in half.items() if ".features.2" not in k and ".features.3" not in k}
    torch.save({"model": half}, tmp_path / "half.pt")
    assert main(["port", "--sam3_weights", str(tmp_path / "half.pt"), "--output_dir", str(tmp_path / "w"),
                 "--config", str(TINY)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("half.pt") == 1 and f"stage-1 {KIND} trunk" in err
    assert f"missing key: {STAGE1_PREFIX}head.0.weight" in err
    assert f"missing key: {STAGE1_PREFIX}backbone.model.features.2.token_mixer.0.conv.c.weight" in err


def test_config_naming_another_trunk_is_refused(stage1, capsys):
    path, _ = stage1
    with pytest.raises(
        Es3Error, match=f"the checkpoint's trunk is {KIND}, but MODEL.TRUNK.KIND is tiny_vit_11m"
    ):
        weights.load(path, TINY, overrides=["MODEL.TRUNK.KIND", "tiny_vit_11m"])
    with pytest.raises(config_lib.ConfigError, match=r"MODEL\.TRUNK\.KIND: 'resnet50' is not one of"):
        config_lib.load(TINY, ["MODEL.TRUNK.KIND", "resnet50"])


def _frames(root: Path, count: int) -> Path:
    video = root / "bedroom"
    video.mkdir(parents=True)
    for i in range(count):
        (video / f"{i:05d}.jpg").symlink_to((BEDROOM / f"{i:05d}.jpg").resolve())
    return root


@pytest.mark.skipif(not BEDROOM.is_dir(), reason="fixtures absent")
def test_embed_writes_the_trunks_features_and_a_run_of_another_trunk_refuses_them(stage1, tmp_path, capsys):
    path, _ = stage1
    data, store_dir = _frames(tmp_path / "data", 3), tmp_path / "store"
    assert main(["embed", "--sam3_weights", str(path), "--data_dir", str(data), "--output_dir", str(store_dir),
                 "--no_progress", "--config", str(TINY), "DATA.EMBEDDING_DTYPE", "float32"]) == 0  # fmt: skip
    store = EmbeddingStore(store_dir, expect={"trunk_kind": KIND})
    stored = store.read("bedroom", [0, 1, 2], dtype=np.float32)
    assert store.metadata("bedroom")["trunk_kind"] == KIND
    # The same features computed directly: the ported trunk on the same frames.
    loaded = weights.load(path, TINY)
    cfg = loaded.cfg
    trunk = trunk_from_config(cfg, loaded.trunk)
    size = cfg.MODEL.TEACHER.IMAGE_SIZE
    images = np.stack([load_frame_uint8(BEDROOM / f"{i:05d}.jpg", size)[0] for i in range(3)])
    direct = np.asarray(
        jax.jit(trunk)(normalize(jnp.asarray(images), cfg.DATA.PIXEL_MEAN, cfg.DATA.PIXEL_STD))
    )
    assert stored.shape == direct.shape == (3, 16, 16, OUT_DIM)
    upstream.report(
        f"es3 embed with a stage-1 {KIND} checkpoint: store vs direct features", stored, direct, 1e-5
    )
    # The store is refused by a run whose trunk is another (here SAM3's ViT of a random teacher).
    capsys.readouterr()
    rc = main(["train", "--config", str(TINY), "--output_dir", str(tmp_path / "run"),
               "DATA.USE_PRECOMPUTED", "True", "DATA.EMBEDDING_DIR", str(store_dir), "DATA.SAV_ROOT", str(data),
               "TRAIN.MAX_STEPS", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc != 0 and f"trunk_kind: the store has '{KIND}', expected 'sam3_vit'" in err


# In `make test-slow` (about a minute here): make test keeps the stage-1 port both ways, its embedding
# and the seed student's export-and-track parity.
@pytest.mark.slow
@pytest.mark.skipif(not BEDROOM.is_dir(), reason="fixtures absent")
def test_export_keeps_the_trunk_and_the_fully_efficient_model_tracks(stage1, tmp_path):
    path, sd = stage1
    cfg = config_lib.load(TINY)
    student = weights.Weights(
        cfg, "random student", "random", student=param_dict(student_from_config(cfg, seed=1))
    )
    stage2 = weights.save(tmp_path / "student", student)
    merged = tmp_path / "merged.pt"
    assert main(["export", "--stage2_weights", str(stage2), "--sam3_weights", str(path),
                 "--output_path", str(merged)]) == 0  # fmt: skip
    written = torch.load(merged, weights_only=True)["model"]
    for key, value in find_stage1_trunk(sd).items():
        assert torch.equal(written[key], value), f"{key} changed in the export"
    ids = np.zeros((540, 960), np.uint8)
    ids[300:400, 150:270] = 1
    mask = write_palette_png(tmp_path / "prompt.png", ids)
    out = tmp_path / "track"
    data = _frames(tmp_path / "data", 6) / "bedroom"
    assert main(["track", "--checkpoint", str(merged), "--frames", str(data), "--mask", str(mask),
                 "--output_dir", str(out), "--memory", "student"]) == 0  # fmt: skip
    pngs = sorted((out / "masks").glob("*.png"))
    assert len(pngs) == 6 and read_palette_png(pngs[0]).shape == (540, 960)
    first = read_palette_png(pngs[0]) == 1
    assert (first & (ids == 1)).sum() / (first | (ids == 1)).sum() > 0.9
    record = json.loads(json.dumps(weights.load(merged).report))
    assert record["trunk"] == KIND and record["memory"] == "student"
