"""The grain pipeline on synthetic SA-V videos and a real embedding store: batch contents, determinism,
resuming from a saved iterator state, host sharding, and a 2-process global batch."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from es3_jax import config as config_lib
from es3_jax.data import (
    clips,
    embedding_store,
    frames,
    indexing,
    loading,
    pipeline,
    sa1b,
    sav,
    synthetic,
    videos,
)
from es3_jax.data.source import PipelineError

REPO = Path(__file__).resolve().parents[2]
NUM_VIDEOS = 7
FEATURE = (2, 2, 4)  # h, w, C of the fake trunk features


def _features(video: int, num_frames: int) -> np.ndarray:
    """[T, h, w, C] with the video index in channel 0 and the frame position in channel 1 (exact in bf16)."""
    f = np.zeros((num_frames, *FEATURE), np.float32)
    f[..., 0] = video
    f[..., 1] = np.arange(num_frames)[:, None, None]
    return f


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sav")
    frames_root, store_root = root / "frames", root / "store"
    names = synthetic.make_synthetic(frames_root, NUM_VIDEOS, seed=3, num_frames=12, height=48, width=64)
    store = embedding_store.EmbeddingStore(store_root)
    ident = embedding_store.identity("test-trunk", (0.5,) * 3, (0.5,) * 3, 56)
    for i, name in enumerate(names):
        stems = videos.numbered_frame_stems(frames_root / name)
        w = store.begin_video(name, frame_names=stems, feature_shape=FEATURE, dtype="bfloat16", ident=ident)
        w.write(0, _features(i, len(stems)))
        w.commit()
    cfg = config_lib.load(
        overrides=[
            *("DATA.SAV_ROOT", str(frames_root), "DATA.EMBEDDING_DIR", str(store_root)),
            *(
                "DATA.NUM_FRAMES",
                "4",
                "DATA.MAX_OBJECTS",
                "2",
                "DATA.MASK_SIZE",
                "40",
                "DATA.VAL_VIDEOS",
                "1",
            ),
            *("DATA.REVERSE_PROB", "0.5", "DATA.NUM_WORKERS", "0", "MODEL.TEACHER.IMAGE_SIZE", "56"),
        ]
    )
    return cfg, names


def _build(cfg, **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return pipeline.build_pipeline(cfg, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_contents(dataset):
    cfg, names = dataset
    pipe = _build(cfg)
    assert not pipe.problems and len(pipe.videos) == NUM_VIDEOS - 1 and pipe.steps_per_epoch == 3
    for batch in _take(iter(pipe), 4):
        assert batch["embeddings"].shape == (2, 4, *FEATURE) and batch["embeddings"].dtype.name == "bfloat16"
        assert batch["masks"].shape == (2, 4, 2, 40, 40) and batch["masks"].dtype == bool
        assert batch["object_valid"].shape == (2, 2) and batch["object_ids"].dtype == np.int32
        assert batch["frame_indices"].shape == (2, 4) and batch["clip_valid"].all()
        for b in range(2):
            entry = pipe.loader.entries[batch["video_index"][b]]
            emb = batch["embeddings"][b].astype(np.float32)
            np.testing.assert_array_equal(emb[..., 0], names.index(entry.name))
            np.testing.assert_array_equal(emb[:, 0, 0, 1], batch["frame_indices"][b])
            np.testing.assert_array_equal(batch["frame_numbers"][b], 4 * batch["frame_indices"][b])
            step = np.diff(batch["frame_numbers"][b])
            np.testing.assert_array_equal(step, -4 if batch["reversed"][b] else 4)
            valid = batch["object_valid"][b]
            assert valid[0] and (batch["object_ids"][b][~valid] == -1).all()
            ann = sav.read_sav_json(entry.annotation[0])
            for o in np.flatnonzero(valid):
                for t, a in enumerate(batch["frame_indices"][b]):
                    gt = ann.masks(int(a), [int(batch["object_ids"][b, o])])
                    np.testing.assert_array_equal(batch["masks"][b, t, o], loading._resize_masks(gt, 40)[0])
                assert batch["masks"][b, 0, o].any()  # visible on the clip's first frame
            assert not batch["masks"][b][:, ~valid].any()


def test_frames_instead_of_embeddings(dataset):
    cfg, _ = dataset
    cfg = dataclasses.replace(cfg, DATA=dataclasses.replace(cfg.DATA, USE_PRECOMPUTED=False))
    pipe = _build(cfg, batch_size=1)
    batch = next(iter(pipe))
    assert "embeddings" not in batch and batch["images"].shape == (1, 4, 56, 56, 3)
    entry = pipe.loader.entries[batch["video_index"][0]]
    folder = Path(cfg.DATA.SAV_ROOT) / entry.name
    paths = [folder / f"{n:05d}.jpg" for n in batch["frame_numbers"][0]]
    expected = frames.normalize(np.stack([frames.load_frame_uint8(p, 56)[0] for p in paths]), (0.5,) * 3, (0.5,) * 3)
    np.testing.assert_array_equal(batch["images"][0], expected)  # as `es3 embed` and the predictor prepare them


def test_same_seed_same_batches_and_epochs_differ(dataset):
    cfg, _ = dataset
    a = _take(iter(_build(cfg)), 6)
    _assert_same(a, _take(iter(_build(cfg)), 6))
    assert not np.array_equal(a[0]["masks"], _take(iter(_build(cfg, seed=1)), 1)[0]["masks"])
    per_epoch = [np.sort(np.concatenate([b["video_index"] for b in a[e * 3 : e * 3 + 3]])) for e in range(2)]
    np.testing.assert_array_equal(per_epoch[0], per_epoch[1])  # every epoch draws 6 of the 6 train videos
    np.testing.assert_array_equal(per_epoch[0], np.arange(6))


def test_resume_from_iterator_state(dataset):
    cfg, _ = dataset
    it = iter(_build(cfg))
    _take(it, 2)
    state = it.get_state()
    rest = _take(it, 5)
    resumed = iter(_build(cfg))
    resumed.set_state(state)
    _assert_same(rest, _take(resumed, 5))
    _assert_same(rest, _take(_build(cfg).iterator(start_step=2), 5))


def test_resume_with_worker_processes_through_orbax(dataset, tmp_path):
    """2 spawned workers (the store opens inside them); the state goes through an orbax checkpoint."""
    cfg, _ = dataset
    it = iter(_build(cfg, num_workers=2))
    try:
        _take(it, 3)
        with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
            mgr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
            mgr.wait_until_finished()
        rest = _take(it, 4)
    finally:
        it.close()
    resumed = iter(_build(cfg, num_workers=2))
    try:
        with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
            mgr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
        _assert_same(rest, _take(resumed, 4))
    finally:
        resumed.close()
    _assert_same(rest, _take(iter(_build(cfg)), 7)[3:])  # workers change nothing


def test_processes_read_disjoint_clips_covering_the_epoch(dataset):
    cfg, _ = dataset
    single = _take(iter(_build(cfg, batch_size=2)), 3)  # one epoch, global batch 2
    parts = [_build(cfg, batch_size=1, process_index=p, process_count=2) for p in range(2)]
    assert [p.steps_per_epoch for p in parts] == [3, 3]
    local = [_take(iter(p), 3) for p in parts]
    seen = [np.concatenate([b["video_index"] for b in batches]) for batches in local]
    assert not set(seen[0]) & set(seen[1]) and sorted([*seen[0], *seen[1]]) == list(range(6))
    for k in range(3):  # the global batch does not depend on the number of processes
        glued = {key: np.concatenate([local[0][k][key], local[1][k][key]]) for key in single[k]}
        _assert_same([single[k]], [glued])


def test_validation_split(dataset):
    cfg, _ = dataset
    train = _build(cfg)
    val = _build(cfg, split="val", batch_size=4)
    assert len(val.videos) == 1 and not set(val.videos) & set(train.videos)
    batches = list(val)
    assert len(batches) == 1 and batches[0]["clip_valid"].tolist() == [True, False, False, False]
    again = next(iter(_build(cfg, split="val", batch_size=4, seed=9)))
    _assert_same(batches, [again])  # validation clips are fixed
    assert not batches[0]["reversed"].any()
    assert (
        indexing.split_videos([f"v{i}" for i in range(100)], 0.05)[1]
        == indexing.split_videos([f"v{i}" for i in range(100, 0, -1)], 0.05)[1]
    )


def test_bad_config_and_too_few_videos(dataset):
    cfg, _ = dataset
    bad = dataclasses.replace(cfg, DATA=dataclasses.replace(cfg.DATA, FRAME_SKIP=6))
    with pytest.raises(PipelineError, match="FRAME_SKIP"):
        _build(bad)
    with pytest.raises(PipelineError, match="fewer than one global batch"):
        _build(cfg, batch_size=7)
    long = dataclasses.replace(cfg, DATA=dataclasses.replace(cfg.DATA, NUM_FRAMES=13))
    with pytest.raises(PipelineError, match="no 13-frame clip"):
        _build(long)


WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    import numpy as np
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from jax.experimental import multihost_utils
    from es3_jax import config as config_lib
    from es3_jax.data import pipeline
    from es3_jax.train import sharding
    cfg = config_lib.load(overrides=sys.argv[4:])
    pipe = pipeline.build_pipeline(cfg, batch_size=2, num_epochs=1)   # process index/count from jax
    mesh = sharding.make_mesh(cfg.MESH)   # every device of both processes on the data axis
    local, glob = [], []
    for batch in pipe:
        g = sharding.global_batch(batch, mesh)
        assert g["masks"].shape[0] == 4 and g["embeddings"].shape[0] == 4
        local.append(batch["video_index"].tolist())
        glob.append(np.asarray(multihost_utils.process_allgather(g["video_index"], tiled=True)).tolist())
        total = jax.jit(lambda x: x.astype(np.float32).sum())(g["embeddings"][..., 0])
        glob[-1].append(float(total))
    json.dump({"local": local, "global": glob}, open(out, "w"))
    jax.distributed.shutdown()
    """
)


def test_two_processes_build_global_batches(dataset, tmp_path):
    """Two jax.distributed processes on localhost: disjoint local clips, equal batch counts, and the
    global batch assembled by make_array_from_process_local_data is their concatenation."""
    cfg, names = dataset
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = [
        *("DATA.SAV_ROOT", cfg.DATA.SAV_ROOT, "DATA.EMBEDDING_DIR", cfg.DATA.EMBEDDING_DIR),
        *("DATA.NUM_FRAMES", "4", "DATA.MAX_OBJECTS", "2", "DATA.MASK_SIZE", "16", "DATA.VAL_VIDEOS", "2"),
        *("DATA.NUM_WORKERS", "0", "MODEL.TEACHER.IMAGE_SIZE", "56"),
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(p), str(port), str(tmp_path / f"out{p}.json"), *overrides],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    out = [json.loads((tmp_path / f"out{p}.json").read_text()) for p in range(2)]
    assert len(out[0]["local"]) == len(out[1]["local"]) == 1  # 5 train videos, global batch 4
    seen = [[v for batch in o["local"] for v in batch] for o in out]
    assert not set(seen[0]) & set(seen[1])
    train = _build(dataclasses.replace(cfg, DATA=dataclasses.replace(cfg.DATA, VAL_VIDEOS=2)))
    order = [int(train.loader.clip(0, s)[0].video) for s in range(4)]
    assert seen[0] + seen[1] == order  # the epoch's first global batch, process 0 then 1
    for o in out:
        *videos, total = o["global"][0]
        assert videos == seen[0] + seen[1]
        index_of = {n: i for i, n in enumerate(names)}
        expected = sum(index_of[train.videos[v]] for v in videos) * 4 * int(np.prod(FEATURE[:2]))
        assert total == expected


def test_problems_are_reported_and_strict_refuses_skipped_videos(dataset):
    cfg, names = dataset
    entries, problems = indexing.index_dataset(cfg, store=pipeline.open_store(cfg))
    assert not problems
    found = [videos.Problem(f"bad{i}", f"reason {i}") for i in range(7)]
    found.append(videos.Problem(names[0], "objects [2] are never visible and were dropped", skipped=False))
    lines, record = indexing.problem_report(_build(cfg, index=(entries, found)).problems)
    assert lines == [
        "data: videos skipped: 7, kept without some objects: 1 (DATA.STRICT True makes a skipped video an error)",
        *(f"data: skipped bad{i}: reason {i}" for i in range(5)),
        "data: ... and 2 more skipped",
        f"data: kept {names[0]}: objects [2] are never visible and were dropped (video kept)",
    ]
    assert record == {
        "skipped_videos": 7,
        "videos_with_objects_dropped": 1,
        **{f"skipped/bad{i}": 1 for i in range(5)},
        f"objects_dropped/{names[0]}": 1,
    }
    assert indexing.problem_report([]) == ([], {})
    strict = dataclasses.replace(cfg, DATA=dataclasses.replace(cfg.DATA, STRICT=True))
    with pytest.raises(
        PipelineError,
        match=r"DATA\.STRICT: videos the index left out \(7\): bad0: reason 0; .*; and 2 more",
    ):
        _build(strict, index=(entries, found))
    _build(strict, index=(entries, found[-1:]))  # a video kept without some objects is no error


# -- several sources, SA-1B pseudo-videos and augmentation (frames) --------------------------------


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """40 small SA-V videos and 100 SA-1B images, mixed 0.7 / 0.3, frames augmented."""
    root = tmp_path_factory.mktemp("mixed")
    synthetic.make_synthetic(root / "sav", 40, seed=4, num_frames=4, height=48, width=64)
    synthetic.make_sa1b(root / "sa1b", 100, seed=4, height=48, width=64)
    cfg = config_lib.load(
        overrides=[
            *("DATA.USE_PRECOMPUTED", "False", "DATA.SAV_ROOT", str(root / "sav")),
            *("DATA.SA1B.ROOT", str(root / "sa1b"), "DATA.SOURCES", "[sav, sa1b]"),
            *("DATA.SOURCE_WEIGHTS", "[0.7, 0.3]", "DATA.AUG.ENABLED", "True"),
            *("DATA.NUM_FRAMES", "3", "DATA.MAX_OBJECTS", "2", "DATA.MASK_SIZE", "16"),
            *("DATA.VAL_VIDEOS", "2", "DATA.NUM_WORKERS", "0", "MODEL.TEACHER.IMAGE_SIZE", "28"),
        ]
    )
    return cfg


def _with(cfg, **data):
    return dataclasses.replace(cfg, DATA=dataclasses.replace(cfg.DATA, **data))


def test_sources_are_mixed_by_weight_over_an_epoch(mixed):
    pipe = _build(mixed, batch_size=3, num_epochs=1)
    assert pipe.sources == ("sav", "sa1b") and pipe.steps_per_epoch == 18  # 38 videos / 0.7 -> 54 clips
    batches = list(pipe)
    source = np.concatenate([b["source"] for b in batches])
    share = np.bincount(source, minlength=2) / len(source)
    np.testing.assert_allclose(share, [0.7, 0.3], atol=0.02)
    items = np.concatenate([b["video_index"] for b in batches])
    assert len(set(items.tolist())) == len(items)  # no item twice in an epoch
    assert pipe.mixing() == {"weight/sav": 0.7, "weight/sa1b": 0.3, "epoch_clips/sav": 38.0, "epoch_clips/sa1b": 16.0}
    for b in batches:
        for k in range(3):
            entry = pipe.loader.entries[b["video_index"][k]]
            assert entry.source == pipe.sources[b["source"][k]]
    val = _build(mixed, split="val", batch_size=2)
    assert val.sources == ("sav",) and len(val.videos) == 2  # held out of the first source only


def test_an_augmented_mixed_pipeline_resumes_exactly(mixed):
    it = iter(_build(mixed))
    _take(it, 3)
    state = it.get_state()
    rest = _take(it, 4)
    resumed = iter(_build(mixed))
    resumed.set_state(state)
    _assert_same(rest, _take(resumed, 4))
    _assert_same(rest, _take(_build(mixed).iterator(start_step=3), 4))
    plain = _take(iter(_build(_with(mixed, AUG=dataclasses.replace(mixed.DATA.AUG, ENABLED=False)))), 7)[3:]
    assert not np.array_equal(rest[0]["images"], plain[0]["images"])  # the augmentation did something
    np.testing.assert_array_equal(rest[0]["video_index"], plain[0]["video_index"])  # and nothing else


def test_an_sa1b_clip_starts_on_its_image_with_the_filtered_masks(mixed):
    cfg = _with(mixed, AUG=dataclasses.replace(mixed.DATA.AUG, ENABLED=False), SA1B=dataclasses.replace(
        mixed.DATA.SA1B, MIN_AREA=0.05, MAX_AREA=0.5))
    pipe = _build(cfg, batch_size=1)
    loader = pipe.loader
    slot = next(s for s in range(30) if loader.mix.source_of(loader.clip(0, s)[0].video) == 1)
    clip, _ = loader.clip(0, slot)
    ex = loader.load(clip, slot=(0, slot))
    entry = loader.entries[clip.video]
    annotation = sa1b.read_sa1b_json(entry.json_path)
    valid = ex["object_valid"]
    ids = ex["object_ids"][valid]
    assert 0 < len(ids) <= 2 and set(ids) <= set(annotation.select(loader.formats["sa1b"].filter).tolist())
    area = np.array([annotation.annotations[i]["area"] for i in ids]) / (48 * 64)
    assert ((area >= 0.05) & (area <= 0.5)).all()
    np.testing.assert_array_equal(ex["masks"][0, valid], loading._resize_masks(annotation.masks(ids), 16))
    image = frames.normalize(frames.resize_frame(sa1b.load_image(entry, annotation), 28), (0.5,) * 3, (0.5,) * 3)
    np.testing.assert_array_equal(ex["images"][0], image)
    assert not np.array_equal(ex["masks"][-1], ex["masks"][0])  # it moves
    np.testing.assert_array_equal(ex["frame_numbers"], [0, 1, 2])
    np.testing.assert_array_equal(loader.load(clip, slot=(0, slot))["images"], ex["images"])
    assert not np.array_equal(loader.load(clip, slot=(1, slot))["images"], ex["images"])


def test_sources_and_augmentation_refuse_what_they_cannot_do(mixed, dataset):
    cfg, _ = dataset
    with pytest.raises(PipelineError, match=r"DATA\.USE_PRECOMPUTED False or DATA\.AUG\.ENABLED False"):
        _build(_with(cfg, AUG=dataclasses.replace(cfg.DATA.AUG, ENABLED=True)))
    with pytest.raises(PipelineError, match='does not list "sa1b"'):
        _build(_with(mixed, SOURCES=(), SOURCE_WEIGHTS=()))
    with pytest.raises(PipelineError, match=r"DATA\.DAVIS_ROOT is empty"):
        _build(_with(mixed, SOURCES=("sav", "davis", "sa1b"), SOURCE_WEIGHTS=(1.0, 1.0, 1.0)))
    store_cfg = _with(cfg, SA1B=mixed.DATA.SA1B, SOURCES=("sav", "sa1b"), SOURCE_WEIGHTS=(0.5, 0.5))
    with pytest.raises(PipelineError, match="no stored trunk features"):
        _build(store_cfg)
    strict = _with(mixed, SA1B=dataclasses.replace(mixed.DATA.SA1B, MIN_PREDICTED_IOU=1.5))
    with pytest.raises(PipelineError, match=r"no mask passes the DATA\.SA1B filters"):
        _take(iter(_build(strict)), 2)


def test_an_image_without_a_kept_mask_gives_its_slot_to_the_next(mixed, tmp_path, caplog):
    root = tmp_path / "sa1b"
    synthetic.make_sa1b(root, 3, seed=5, height=48, width=64)
    first = json.loads((root / "sa_1.json").read_text())
    for a in first["annotations"]:
        a["predicted_iou"] = 0.1
    (root / "sa_1.json").write_text(json.dumps(first))
    cfg = _with(mixed, SA1B=dataclasses.replace(mixed.DATA.SA1B, ROOT=str(root), MIN_PREDICTED_IOU=0.5))
    loader = _build(cfg).loader
    index = next(i for i, e in enumerate(loader.entries) if getattr(e, "name", "") == "sa_1")
    with caplog.at_level("WARNING"):
        ex = loader.load(clips.image_clip(loader.spec, index), slot=(0, 0))
    assert loader.entries[ex["video_index"]].name == "sa_2" and ex["object_valid"].any()
    assert "sa_1.json: no mask passes the DATA.SA1B filters" in caplog.text
