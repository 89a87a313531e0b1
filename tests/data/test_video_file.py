"""Video files through PyAV: frames and timestamps as written, random access equal to sequential
decoding, truncated and corrupt files named with their frame, the overlay writer's timestamps, a
stream read from a pipe, and tracking a file equal to tracking its decoded frames."""

from __future__ import annotations

import fractions
import os
import random
import threading
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from es3_jax import weights
from es3_jax.data.video_file import VideoFile, VideoFileError, VideoWriter, stream_frames
from es3_jax.models.tracker import build_tracker
from es3_jax.predictor import VideoPredictor

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
H, W = 96, 128
# Milliseconds: a variable frame rate (25 fps, a pause, 100 fps, a long gap, then 30 fps).
TIMES_MS = [0, 40, 80, 200, 210, 220, 400] + [400 + 33 * k for k in range(1, 18)]
MS = fractions.Fraction(1, 1000)


def moving_shapes(t: int) -> np.ndarray:
    """Frame t `[H, W, 3]` uint8 of a small synthetic clip: a red box going right, a green one up."""
    image = np.zeros((H, W, 3), np.uint8)
    image[..., 2] = 40
    x = 10 + 3 * t
    image[20:50, x : x + 25] = (230, 40, 40)
    y = 70 - 2 * t
    image[y : y + 20, 80:110] = (40, 220, 60)
    return image


def prompt_masks() -> dict[int, np.ndarray]:
    """The two boxes on frame 0, by object id."""
    red = np.zeros((H, W), bool)
    red[20:50, 10:35] = True
    green = np.zeros((H, W), bool)
    green[70:90, 80:110] = True
    return {1: red, 2: green}


def write_clip(path: Path, options: dict | None = None, frames: int = len(TIMES_MS)) -> Path:
    """The clip's first `frames` frames as H.264 .mp4 with their variable frame times, a keyframe
    every 6 frames and B-frames."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.time_base = stream.time_base = MS
        stream.options = {"g": "6", "bf": "2"}
        for t, ms in enumerate(TIMES_MS[:frames]):
            frame = av.VideoFrame.from_ndarray(moving_shapes(t), format="rgb24")
            frame.pts, frame.time_base = ms, MS
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decode_all(path: Path) -> tuple[np.ndarray, list[float]]:
    """Every frame of a file decoded by PyAV in one pass `[T, H, W, 3]`, and their times (s)."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    return np.stack([f.to_ndarray(format="rgb24") for f in frames]), [
        float(f.pts * f.time_base) for f in frames
    ]


def remux_nut(clip: Path, nut: Path) -> Path:
    """The clip's packets in a NUT stream (as `ffmpeg -i clip.mp4 -c copy -f nut -` writes), no re-encoding."""
    with av.open(str(clip)) as src, av.open(str(nut), "w") as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(video=0):
            if packet.size:
                packet.stream = stream
                dst.mux(packet)
    return nut


def packets(path: Path) -> list[av.Packet]:
    with av.open(str(path)) as container:
        return [p for p in container.demux(video=0) if p.size]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("video") / "clip.mp4")


def test_frames_and_timestamps_read_back_as_written(clip):
    video = VideoFile(clip)
    frames, times = decode_all(clip)
    assert video.num_frames == len(TIMES_MS) == len(frames)
    assert video.video_size == (H, W)
    # The variable frame rate survives: each frame's own time, not a fixed fps.
    assert video.timestamps.tolist() == [ms / 1000 for ms in TIMES_MS] == times
    sequential = np.stack([video.frame(i) for i in range(video.num_frames)])
    assert np.array_equal(sequential, frames)
    # What was encoded (lossy, so close rather than equal): the boxes are where they were drawn.
    drawn = np.stack([moving_shapes(t) for t in range(len(TIMES_MS))]).astype(int)
    assert np.abs(sequential.astype(int) - drawn).mean() < 3


def test_reverse_and_random_access_equal_sequential_decoding(clip):
    assert sum(p.is_keyframe for p in packets(clip)) >= 4  # seeks have keyframes to land on
    sequential = decode_all(clip)[0]
    video = VideoFile(clip, cache_frames=2)  # a cache too small to hide the seeks
    order = list(range(len(TIMES_MS)))[::-1] + random.Random(0).sample(range(len(TIMES_MS)), len(TIMES_MS))
    for i in order:
        assert np.array_equal(video.frame(i), sequential[i]), i


def test_a_file_cut_before_its_index_cannot_be_opened(clip, tmp_path):
    cut = tmp_path / "clip.mp4"
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size * 2 // 3])  # the index (moov) is at the end
    with pytest.raises(VideoFileError, match=r"clip\.mp4: not a readable video \(truncated\?\)"):
        VideoFile(cut)


def test_a_file_cut_inside_its_frames_names_the_frame(tmp_path):
    whole = write_clip(tmp_path / "whole.mp4", options={"movflags": "faststart"})  # the index first
    stored = packets(whole)
    cut = tmp_path / "clip.mp4"
    cut.write_bytes(whole.read_bytes()[: stored[10].pos + stored[10].size // 2])  # inside frame 10's data
    with pytest.raises(
        VideoFileError, match=r"clip\.mp4: frame 10 of 24 cannot be read: .* \(is the file truncated\?\)"
    ):
        VideoFile(cut)


def test_a_frame_that_cannot_be_decoded_is_named(clip, tmp_path):
    stored = packets(clip)
    bad = stored[13]
    order = sorted(p.pts for p in stored)
    data = bytearray(clip.read_bytes())
    data[bad.pos : bad.pos + bad.size] = bytes(bad.size)
    broken = tmp_path / "clip.mp4"
    broken.write_bytes(bytes(data))
    video = VideoFile(broken)  # the index is whole
    k = order.index(bad.pts)
    assert np.array_equal(video.frame(0), decode_all(clip)[0][0])
    with pytest.raises(
        VideoFileError, match=rf"clip\.mp4: frame {k} of 24 cannot be decoded: .*corrupt or truncated"
    ):
        for i in range(video.num_frames):
            video.frame(i)


def test_the_writer_keeps_a_source_s_timestamps_and_evens_its_size(clip, tmp_path):
    source = VideoFile(clip)
    out = tmp_path / "overlay.mp4"
    with VideoWriter(out, time_base=source.time_base) as writer:
        for i in range(source.num_frames):
            writer.write(source.frame(i)[: H - 1, : W - 1], float(source.timestamps[i]))  # 127 x 95
    back = VideoFile(out)
    assert back.num_frames == source.num_frames
    assert back.timestamps.tolist() == source.timestamps.tolist()
    assert back.video_size == (H, W)  # the last row and column repeated
    assert np.abs(back.frame(5).astype(int) - source.frame(5).astype(int)).mean() < 3


def test_the_writer_places_frames_without_times_at_its_fps(tmp_path):
    out = tmp_path / "folder.mp4"
    with VideoWriter(out, fps=24) as writer:
        for t in range(5):
            writer.write(moving_shapes(t))
    assert VideoFile(out).timestamps.tolist() == [t / 24 for t in range(5)]


def test_a_stream_from_a_pipe_gives_the_frames_and_times(clip, tmp_path):
    """The clip's packets remuxed (not re-encoded) into NUT and read through an OS pipe, which
    cannot seek, as `es3 track --frames -` reads stdin."""
    nut = remux_nut(clip, tmp_path / "clip.nut")
    read, write = os.pipe()
    feeder = threading.Thread(target=lambda: (os.write(write, nut.read_bytes()), os.close(write)))
    feeder.start()
    with os.fdopen(read, "rb") as pipe:
        got = list(stream_frames(pipe, "stdin"))
    feeder.join()
    frames, times = decode_all(clip)
    assert len(got) == len(frames)
    assert all(np.array_equal(g.image, f) for g, f in zip(got, frames, strict=True))
    starts = [g.time - got[0].time for g in got]
    assert np.allclose(starts, times, atol=1e-9)


def test_an_absent_capture_device_is_named():
    with pytest.raises(VideoFileError, match=r"/dev/video99: not a readable video stream"):
        next(stream_frames("/dev/video99", "/dev/video99"))


@pytest.fixture(scope="module")
def predictor() -> VideoPredictor:
    """The tiny random-weight tracker with its object-score head biased to "present": random
    weights otherwise score every tracked frame "no object" (a blank -1024 mask whatever the frames),
    which would make the comparisons below vacuous."""
    loaded = weights.load(None, TINY)
    params = loaded.tracker
    params["mask_decoder"]["pred_obj_score_head"]["layers"][2]["bias"] = np.full((1,), 20.0, np.float32)
    tracker = build_tracker(loaded.cfg.MODEL.TEACHER, params)
    return VideoPredictor(loaded.cfg, tracker, trunk_params=lambda: loaded.trunk_params(0))


def track(predictor: VideoPredictor, video, frames: int | None = None) -> np.ndarray:
    """Logits `[T, 2, H, W]` of the two boxes prompted on frame 0, over the first `frames` frames."""
    state = predictor.init_state(video)
    for obj_id, mask in prompt_masks().items():
        predictor.add_new_mask(state, 0, obj_id, mask)
    last = None if frames is None else frames - 1
    return np.stack(
        [logits for _, _, logits in predictor.propagate_in_video(state, max_frame_num_to_track=last)]
    )


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two masks; 1 for two empty masks."""
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def test_a_video_file_tracks_as_its_decoded_frames(clip, predictor, tmp_path):
    """The file, its frames decoded by PyAV as an array, and those frames as JPEGs, tracked over
    frames 0-11 (25 fps, a pause, 100 fps, a gap). Each holds all 24 frames: a video's length is
    part of the tracker's input (upstream reads min(num_frames, 16) object pointers)."""
    n = 12
    frames = decode_all(clip)[0]
    from_file = track(predictor, str(clip), n)
    assert from_file.shape == (n, 2, H, W)
    assert (from_file[1:] > 0).mean() > 0.1  # tracked masks, not blanks
    assert np.array_equal(from_file, track(predictor, frames, n))
    # JPEGs are re-encoded, so a little different: nearly the same masks. Measured: IoU >= 0.975 at
    # quality 95; a 4 px shift of the frames gives 0.89.
    folder = tmp_path / "jpeg"
    folder.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:05d}.jpg", quality=95)
    from_jpeg = track(predictor, folder, n)
    ious = [iou(from_file[t, o] > 0, from_jpeg[t, o] > 0) for t in range(1, n) for o in range(2)]
    print(
        f"file vs JPEG-folder mask IoU over frames 1-{n - 1}: min {min(ious):.3f}, mean {np.mean(ious):.3f}"
    )
    assert min(ious) > 0.95


@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_a_rotated_video_is_read_as_players_show_it(degrees, tmp_path):
    """A phone's portrait video is stored landscape with a display rotation (counter-clockwise)."""
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.set_display_rotation(degrees)
        for t in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(moving_shapes(t), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    video = VideoFile(path)
    stored = decode_all(path)[0][1]
    shown = np.rot90(stored, degrees // 90)
    assert video.video_size == shown.shape[:2] == ((W, H) if degrees % 180 else (H, W))
    assert np.array_equal(video.frame(1), shown)

    # The red box drawn top-left is where a counter-clockwise turn (FFmpeg's convention) puts it.
    def red(image: np.ndarray) -> np.ndarray:
        return (image[..., 0] > 150) & (image[..., 1] < 100)

    assert iou(red(video.frame(1)), np.rot90(red(moving_shapes(1)), degrees // 90)) > 0.9
