"""`es3 embed`: the job on real frames with a tiny trunk; resume, kill -9, two processes, errors, seed import."""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from es3_jax import config as config_lib
from es3_jax import embed, weights
from es3_jax.cli import main
from es3_jax.data.embedding_store import EmbeddingStore, identity
from es3_jax.data.frames import FrameError, list_videos, load_frame_uint8
from tests.train.runs import cli_env

REPO = Path(__file__).resolve().parents[1]
BEDROOM = REPO / ".." / "shared" / "fixtures" / "bedroom_frames"
TINY = REPO / "configs" / "tiny.yaml"
SPLIT = {"a": range(0, 12), "b": range(12, 24), "c": range(24, 32)}

pytestmark = pytest.mark.skipif(not BEDROOM.is_dir(), reason="fixtures absent")


def _data(root: Path, corrupt: str | None = None) -> Path:
    """The 32 bedroom frames as three SA-V-style videos (symlinks), one frame optionally corrupt."""
    for video, frames in SPLIT.items():
        (root / video).mkdir(parents=True)
        for i in frames:
            dst = root / video / f"{4 * i:05d}.jpg"
            if corrupt == video and i == frames[3]:
                dst.write_bytes(b"not a jpeg")
            else:
                dst.symlink_to((BEDROOM / f"{i:05d}.jpg").resolve())
    return root


def _embed_cmd(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "es3_jax.cli", "embed", "--config", str(TINY), "--data_dir", str(data),
            "--output_dir", str(out), "--batch_size", "2", "--no_progress"]  # fmt: skip


def _run(cmd, **env) -> str:
    proc = subprocess.run(cmd, env=cli_env(**env), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _array_files(store: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and "features.zarr" in p.parts
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process run of the tiny trunk over the three videos."""
    root = tmp_path_factory.mktemp("embed")
    data = _data(root / "data")
    out = root / "store"
    stdout = _run(_embed_cmd(data, out))
    assert "wrote 3 videos (32 frames" in stdout
    return data, out


def test_store_written_and_rerun_does_nothing(reference):
    data, out = reference
    store = EmbeddingStore(out, expect={"image_size": 224, "pixel_mean": [0.5] * 3})
    assert store.videos() == ["a", "b", "c"]
    meta = store.metadata("b")
    assert meta["shape"] == [12, 16, 16, 64] and meta["dtype"] == "bfloat16"
    assert meta["frame_names"][0] == "00048" and meta["orig_size"] == [540, 960]
    glob = json.loads((out / "global_metadata.json").read_text())
    assert glob["videos"] == ["a", "b", "c"] and glob["failed"] == [] and glob["num_processes"] == 1
    assert glob["trunk"] == meta["trunk"] and glob["trunk"].startswith("sha256:")
    x = store.read("c", [7, 0], dtype=np.float32)
    assert x.shape == (2, 16, 16, 64) and np.isfinite(x).all() and x.std() > 0.1
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    stdout = _run(_embed_cmd(data, out))
    assert "wrote 0 videos (0 frames" in stdout and "skipped 3 complete" in stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing touched


def test_kill_9_then_resume_is_byte_identical(reference, tmp_path):
    data, ref = reference
    out = tmp_path / "store"
    proc = subprocess.Popen(
        _embed_cmd(data, out), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    # Kill as soon as the first video is complete: the next one is being written then.
    while not (out / "a" / "metadata.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = EmbeddingStore(out).videos()
    left = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name not in partial)
    print(f"[embed] killed with complete videos {partial}, partial ones {left}")
    assert partial != ["a", "b", "c"] and "a" in partial  # killed mid-run
    for video in partial:  # whatever reads as complete is whole and right
        assert np.array_equal(
            EmbeddingStore(out).read(video, range(len(SPLIT[video]))).view(np.uint16),
            EmbeddingStore(ref).read(video, range(len(SPLIT[video]))).view(np.uint16),
        )
    stdout = _run(_embed_cmd(data, out))
    assert f"skipped {len(partial)} complete" in stdout
    assert _array_files(out) == _array_files(ref)


def test_two_processes_write_what_one_writes(reference, tmp_path):
    data, ref = reference
    out = tmp_path / "store"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            _embed_cmd(data, out),
            env=cli_env(
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr
    # Videos 0 and 2 (a, c) go to process 0, video 1 (b) to process 1.
    assert "process 0/2: wrote 2 videos (20 frames" in outs[0][0]
    assert "process 1/2: wrote 1 videos (12 frames" in outs[1][0]
    glob = json.loads((out / "global_metadata.json").read_text())
    assert glob["num_processes"] == 2 and glob["videos"] == ["a", "b", "c"]
    assert _array_files(out) == _array_files(ref)


def test_unreadable_frame_stop_or_skip(tmp_path):
    data = _data(tmp_path / "data", corrupt="b")
    cfg = config_lib.load(TINY)
    videos = list_videos(data)
    ident = identity("fake", (0.5,) * 3, (0.5,) * 3, 224)

    def features(images):  # a stand-in trunk: every 14th pixel
        return images[:, ::14, ::14, :].astype(np.float32)

    kwargs = dict(ident=ident, feature_shape=(16, 16, 3), batch_size=4, progress=False)
    store = EmbeddingStore(tmp_path / "stop")
    with pytest.raises(FrameError, match=r"frame unreadable: .*b/00060\.jpg"):
        embed.embed_videos(store, videos, features, **kwargs)
    assert store.videos() == ["a"] and not (tmp_path / "stop" / "b").exists()

    store = EmbeddingStore(tmp_path / "skip")
    result = embed.embed_videos(store, videos, features, on_error="skip", **kwargs)
    assert result.written == ["a", "c"] and list(result.failed) == ["b"]
    assert "00060.jpg" in result.failed["b"]
    assert store.videos() == ["a", "c"] and not (tmp_path / "skip" / "b").exists()
    got = store.read("c", [1], dtype=np.float32)[0]
    assert np.array_equal(got, features(_frame(videos[2].paths[1]))[0])

    # The job end to end with --on_error skip lists the video in the global metadata.
    trunk = weights.load(None, cfg, parts=(weights.TRUNK,))
    summary = embed.run(
        cfg, str(data), str(tmp_path / "job"), weights=trunk, batch_size=1, on_error="skip", progress=False
    )
    assert summary["written"] == ["a", "c"] and summary["failed_all"][0]["video"] == "b"
    glob = json.loads((tmp_path / "job" / "global_metadata.json").read_text())
    assert glob["videos"] == ["a", "c"] and glob["failed"][0]["video"] == "b"
    assert "00060.jpg" in glob["failed"][0]["error"]


def _frame(path):
    return load_frame_uint8(path, 224)[0][None]


# `es3 embed` where no file may grow past 100 kB: writing past it fails with EFBIG ("File too
# large") as writing to a full disk fails with ENOSPC, through the same TensorStore error.
_SMALL_FILES = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
from es3_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_full_disk_names_the_video_keeps_the_complete_ones_and_a_rerun_finishes(tmp_path):
    # float32 features of 112 px frames: 16 kB a frame, so the 2-frame video "a" fits in one file
    # and the 16-frame shard of "b" does not.
    for video, frames in (("a", range(2)), ("b", range(2, 18))):
        (tmp_path / "data" / video).mkdir(parents=True)
        for i in frames:
            (tmp_path / "data" / video / f"{i:05d}.jpg").symlink_to((BEDROOM / f"{i:05d}.jpg").resolve())
    out = tmp_path / "store"
    args = ["embed", "--config", str(TINY), "--data_dir", str(tmp_path / "data"), "--output_dir", str(out),
            "--batch_size", "1", "--no_progress", "DATA.EMBEDDING_DTYPE", "float32",
            "MODEL.TEACHER.IMAGE_SIZE", "112", "MODEL.TRUNK.PRETRAIN_IMAGE_SIZE", "56"]  # fmt: skip
    command = [sys.executable, "-c", _SMALL_FILES, *args]
    proc = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (
        f"cannot write video 'b' into the embedding store {out} ({out / 'b'}): File too large" in proc.stderr
    )
    assert EmbeddingStore(out).videos() == ["a"] and not (out / "b").exists()
    kept = (out / "a" / "metadata.json").stat().st_mtime_ns

    assert main(args) == 0  # room again: "b" is written, "a" is kept as it was
    assert EmbeddingStore(out).videos() == ["a", "b"]
    assert (out / "a" / "metadata.json").stat().st_mtime_ns == kept


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_import_seed_folder(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    src = tmp_path / "seed"
    frames = {}
    for video, n in (("sav_000001", 3), ("sav_000002", 18)):
        (src / video).mkdir(parents=True)
        stems = [f"{4 * i:05d}" for i in range(n)]
        for stem in stems:
            t = torch.randn(16, 6, 6)
            torch.save(t, src / video / f"{stem}.pt")
            frames[video, stem] = t.numpy()
        meta = {"video_name": video, "num_frames": n, "feature_shape": [16, 6, 6], "image_size": 84,
                "backbone_stride": 14, "save_format": "pt", "frames": stems, "completed": True}  # fmt: skip
        (src / video / "metadata.json").write_text(json.dumps(meta))
    (src / "global_metadata.json").write_text("{}")
    out = tmp_path / "store"
    assert (
        main(["embed", "--import_pt", str(src), "--output_dir", str(out), "DATA.EMBEDDING_DTYPE", dtype]) == 0
    )
    store = EmbeddingStore(out, expect={"image_size": 84, "trunk": "unknown"})
    assert store.videos() == ["sav_000001", "sav_000002"]
    for (video, stem), chw in frames.items():
        got = store.read(video, [store.frame_index(video, stem)])[0]
        want = np.moveaxis(chw, 0, -1).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert json.loads((out / "global_metadata.json").read_text())["num_complete"] == 2
    # A re-run skips both; a missing frame is named.
    assert (
        main(["embed", "--import_pt", str(src), "--output_dir", str(out), "DATA.EMBEDDING_DTYPE", dtype]) == 0
    )
    (src / "sav_000002" / "00004.pt").unlink()
    assert (
        main(["embed", "--import_pt", str(src), "--output_dir", str(tmp_path / "s2"), "--on_error", "skip"])
        == 0
    )
    assert EmbeddingStore(tmp_path / "s2").videos() == ["sav_000001"]
    assert main(["embed", "--import_pt", str(src), "--output_dir", str(tmp_path / "s3")]) == 2
