"""The embedding store: round trips, random access, completeness, identity checks, pickling, determinism."""

import multiprocessing
import pickle
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from es3_jax.data.embedding_store import EmbeddingStore, StoreError, identity, quantize

IDENT = identity("sha256:test", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224)


def _features(t, seed=0, shape=(6, 5, 8)):
    return np.random.default_rng(seed).standard_normal((t, *shape), dtype=np.float32)


def _write(store, video, feats, dtype="bfloat16", step=3, commit=True):
    stems = [f"{4 * i:05d}" for i in range(len(feats))]
    w = store.begin_video(video, frame_names=stems, feature_shape=feats.shape[1:], dtype=dtype, ident=IDENT)
    for i in range(0, len(feats), step):
        w.write(i, feats[i : i + step])
    if commit:
        w.commit()
    return w


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_round_trip_random_access(tmp_path, dtype):
    feats = _features(37)
    store = EmbeddingStore(tmp_path)
    _write(store, "sav_000001", feats, dtype)
    reader = EmbeddingStore(tmp_path, expect=IDENT)
    assert reader.videos() == ["sav_000001"]
    meta = reader.metadata("sav_000001")
    assert meta["shape"] == [37, 6, 5, 8] and meta["dtype"] == dtype and meta["num_frames"] == 37
    assert meta["frame_names"][:2] == ["00000", "00004"] and meta["layout"] == "THWC"
    assert reader.frame_index("sav_000001", "00008") == 2
    idx = [36, 0, 17, 17, 16, 15]
    got = reader.read("sav_000001", idx)
    want = feats[idx].astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else feats[idx]
    assert got.dtype == want.dtype and got.shape == (6, 6, 5, 8)
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))  # bit-exact after the cast
    assert reader.read("sav_000001", idx, dtype=np.float32).dtype == np.float32
    assert reader.read("sav_000001", []).shape == (0, 6, 5, 8)
    # One frame per chunk inside shards of 16 frames: 37 frames -> 3 shard files.
    shards = [p for p in (tmp_path / "sav_000001" / "features.zarr" / "c").rglob("*") if p.is_file()]
    assert len(shards) == 3
    with pytest.raises(StoreError, match="has 37 frames"):
        reader.read("sav_000001", [37])
    with pytest.raises(StoreError, match="no frame '00001'"):
        reader.frame_index("sav_000001", "00001")


def test_int8_store_keeps_each_value_within_half_a_step(tmp_path):
    # Channels of very different magnitudes, as trunk features have: one scale per frame and channel.
    channel_scale = np.exp(np.random.default_rng(1).normal(0, 2, size=32)).astype(np.float32)
    feats = _features(20, shape=(12, 12, 32)) * channel_scale
    feats[3, :, :, 5] = 0.0  # an all-zero channel
    store = EmbeddingStore(tmp_path)
    _write(store, "v", feats, "int8")
    _write(store, "b", feats, "bfloat16")
    got = EmbeddingStore(tmp_path, expect=IDENT).read("v", list(range(20)))
    assert got.dtype == ml_dtypes.bfloat16 and got.shape == feats.shape
    step = np.abs(feats).max(axis=(1, 2), keepdims=True) / 127
    # Half a quantisation step, plus bf16's rounding (half an ulp, ≤ 2^-8 relative) of the dequantized
    # value, which lies within half a step of x.
    bound = step / 2 + (np.abs(feats) + step / 2) * 2.0**-8 + 1e-30
    err = np.abs(got.astype(np.float32) - feats)
    assert (err <= bound).all(), f"worst error {float((err / bound).max()):.3f} of the bound"
    assert np.all(got[3, :, :, 5] == 0)
    q, scales = quantize(feats)
    assert q.dtype == np.int8 and scales.shape == (20, 32) and np.abs(q).max() == 127

    def disk(video):
        return sum(f.stat().st_size for f in (tmp_path / video).rglob("*.zarr/**/*") if f.is_file())

    assert disk("v") < 0.7 * disk("b"), f"int8 store {disk('v')} B against bf16 {disk('b')} B"


def test_unfinished_video_is_invisible(tmp_path):
    store = EmbeddingStore(tmp_path)
    _write(store, "a", _features(5))
    writer = _write(store, "b", _features(20), commit=False)
    assert store.videos() == ["a"]
    with pytest.raises(StoreError, match="'b' is incomplete"):
        EmbeddingStore(tmp_path).metadata("b")
    with pytest.raises(StoreError, match="not in the store"):
        store.metadata("c")
    assert not store.complete_and_current("b", [f"{4 * i:05d}" for i in range(20)], IDENT)
    writer.abort()
    assert not (tmp_path / "b").exists()
    # A rewrite with different frames replaces the complete video.
    assert store.complete_and_current("a", [f"{4 * i:05d}" for i in range(5)], IDENT)
    assert not store.complete_and_current("a", ["00000"], IDENT)
    _write(store, "a", _features(2, seed=1))
    assert EmbeddingStore(tmp_path).metadata("a")["num_frames"] == 2


def test_mismatch_names_both_values(tmp_path):
    store = EmbeddingStore(tmp_path)
    _write(store, "a", _features(3))
    other = identity("sha256:other", (0.485, 0.456, 0.406), (0.5, 0.5, 0.5), 224)
    with pytest.raises(StoreError, match=r"trunk: the store has 'sha256:test', expected 'sha256:other'") as e:
        EmbeddingStore(tmp_path, expect=other).read("a", [0])
    assert "pixel_mean: the store has [0.5, 0.5, 0.5], expected [0.485, 0.456, 0.406]" in str(e.value)
    with pytest.raises(StoreError, match="trunk"):
        store.check_writable(other, "bfloat16")
    with pytest.raises(StoreError, match="dtype: the store has 'bfloat16', expected 'float32'"):
        store.check_writable(IDENT, "float32")
    store.check_writable(IDENT, "bfloat16")
    store.write_global_metadata({**IDENT, "dtype": "bfloat16", "image_size": 1008})
    with pytest.raises(
        StoreError, match=r"global_metadata\.json.*\n  image_size: the store has 1008, expected 224"
    ):
        EmbeddingStore(tmp_path, expect={"image_size": 224}).videos()


def test_pickles_without_handles_and_reads_concurrently(tmp_path):
    feats = _features(40)
    _write(EmbeddingStore(tmp_path), "v", feats)
    store = EmbeddingStore(tmp_path, expect={"trunk": "sha256:test"})
    store.read("v", [0])
    clone = pickle.loads(pickle.dumps(store))
    assert clone.expect == store.expect and not clone._arrays
    clone._pid = -1  # as if forked: the handles of the parent are dropped, not reused
    assert np.array_equal(clone.read("v", [1]), store.read("v", [1]))
    results, errors = {}, []

    def worker(k):
        try:
            idx = [(7 * k + j) % 40 for j in range(8)]
            results[k] = (idx, clone.read("v", idx))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    want = feats.astype(ml_dtypes.bfloat16)
    for idx, got in results.values():
        assert np.array_equal(got.view(np.uint16), want[idx].view(np.uint16))


def _spawned_read(store, idx):
    return store.read("v", idx).astype(np.float32)


def test_reads_in_a_spawned_worker(tmp_path):
    feats = _features(4)
    _write(EmbeddingStore(tmp_path), "v", feats)
    store = EmbeddingStore(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        got = pool.apply(_spawned_read, (store, [3, 1]))
    assert np.array_equal(got, feats[[3, 1]].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_same_data_same_bytes(tmp_path):
    feats = _features(20)
    for name in ("one", "two"):
        _write(EmbeddingStore(tmp_path / name), "v", feats, step=20 if name == "one" else 1)
    files = sorted(
        p.relative_to(tmp_path / "one") for p in (tmp_path / "one" / "v" / "features.zarr").rglob("*")
    )
    assert files
    for rel in files:
        a, b = tmp_path / "one" / rel, tmp_path / "two" / rel
        assert a.is_dir() or a.read_bytes() == b.read_bytes(), rel


def test_missing_store(tmp_path):
    with pytest.raises(StoreError, match="embedding store not found"):
        EmbeddingStore(Path(tmp_path) / "nope").videos()
