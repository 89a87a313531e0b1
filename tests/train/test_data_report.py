"""A run names the training videos its index left out, before the first step: in train.log and
metrics.jsonl, or, with DATA.STRICT True, as an error."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from es3_jax import config as config_lib
from es3_jax.data import embedding_store, synthetic, videos
from es3_jax.data.source import PipelineError
from es3_jax.train import trainer as trainer_module
from tests.train.runs import LIGHT, MICRO


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """12 synthetic videos and their store (features never read); one annotation cut short."""
    root = tmp_path_factory.mktemp("damaged")
    names = synthetic.make_synthetic(root / "data", 12, num_frames=4, height=64, width=80)
    overrides = [*MICRO, *LIGHT, "DATA.SAV_ROOT", str(root / "data"), "DATA.EMBEDDING_DIR", str(root / "emb")]
    overrides += ["TRAIN.BATCH_SIZE", "1", "TRAIN.EFFECTIVE_BATCH_SIZE", "8"]
    cfg = config_lib.load(None, overrides)
    store = embedding_store.EmbeddingStore(root / "emb")
    d = cfg.DATA
    ident = embedding_store.identity(
        cfg.MODEL.TRUNK.KIND, d.PIXEL_MEAN, d.PIXEL_STD, cfg.MODEL.TEACHER.IMAGE_SIZE
    )
    for name in names:
        stems = videos.numbered_frame_stems(root / "data" / name)
        w = store.begin_video(name, frame_names=stems, feature_shape=(1, 1, 1), dtype="float32", ident=ident)
        w.write(0, np.zeros((len(stems), 1, 1, 1), np.float32))
        w.commit()
    broken = root / "data" / f"{names[3]}_manual.json"
    broken.write_text(broken.read_text()[:100])
    return cfg, names[3], broken


def test_skipped_videos_are_named_at_start_up(damaged, tmp_path, monkeypatch):
    cfg, name, broken = damaged
    # What is reported does not depend on the models, and building them is most of a start-up.
    monkeypatch.setattr(
        trainer_module.weights, "teacher", lambda cfg, **_: SimpleNamespace(cfg=cfg, source="none")
    )
    monkeypatch.setattr(trainer_module, "Learner", lambda *_: SimpleNamespace(trunk_fingerprint=None))
    trainer_module.Trainer(cfg, tmp_path).log.close()
    log = (tmp_path / "train.log").read_text()
    assert "data: videos skipped: 1, kept without some objects: 0" in log
    assert f"data: skipped {name}: {broken}: cannot read the annotation JSON" in log
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record == {
        "step": 0,
        "split": "data",
        "skipped_videos": 1,
        "videos_with_objects_dropped": 0,
        f"skipped/{name}": 1,
    }
    strict = config_lib.apply_overrides(cfg, ["DATA.STRICT", "True"])
    with pytest.raises(
        PipelineError, match=re.escape(f"DATA.STRICT: videos the index left out (1): {name}: {broken}")
    ):
        trainer_module.Trainer(strict, tmp_path / "strict")
