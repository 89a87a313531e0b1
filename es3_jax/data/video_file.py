"""Video files and live video through PyAV (FFmpeg): a random-access reader of a file, the frames of
a stream (a pipe such as stdin, a capture device) one at a time, and an H.264 .mp4 writer.

Frames are RGB uint8 `[H, W, 3]` in presentation order. A file's frames are the packets its
container holds, counted and timed by one demux pass over the file (no decoding): each frame's
presentation time in seconds comes from its own timestamp, so a variable-frame-rate video keeps its
timing, and nothing assumes a fixed fps. Frames are decoded when asked for: the next frame continues
the decoder, a frame behind it or far ahead seeks to the keyframe before it and decodes forward,
and a small cache of the latest decoded frames serves repeated and nearby requests.
"""

from __future__ import annotations

import collections
import fractions
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import av
import numpy as np

from es3_jax.data.frames import FrameError

VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv", ".avi")


class VideoFileError(FrameError):
    """A video file or stream that cannot be read or written; the message names it, and the frame
    at fault where one is."""


def is_video_file(path: str | Path) -> bool:
    """Whether `path` names a video file by its extension (it need not exist)."""
    return Path(path).suffix.lower() in VIDEO_EXTS


def _reason(error: Exception) -> str:
    """FFmpeg's own words for an error, without PyAV's errno and file name decoration."""
    return getattr(error, "strerror", None) or str(error)


def _rgb(frame: av.VideoFrame, coded_size: tuple[int, int]) -> np.ndarray:
    """A decoded frame as RGB uint8 `[H, W, 3]` the way players show it: scaled to the stream's
    `coded_size` (H, W) where its resolution changes part-way, then turned by its display rotation
    (a phone's portrait video is stored landscape), as ffmpeg does."""
    h, w = coded_size
    image = frame.to_ndarray(format="rgb24", width=w, height=h)
    turns = round(frame.rotation / 90) % 4  # counter-clockwise quarter turns
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


class VideoFile:
    """A video file's frames, decoded as they are asked for.

    num_frames, video_size (H, W), time_base (of the stream's timestamps), pts `[T]` int64 and
    timestamps `[T]` float64 (seconds; the container's presentation times, not rebased to 0), both
    in presentation order. `frame(i)` -> `[H, W, 3]` uint8 RGB. A VideoFileError names the file and
    the frame for a file that cannot be opened, read to the end, or decoded.
    """

    def __init__(self, path: str | Path, cache_frames: int = 16):
        self.path = Path(path)
        self.name = str(path)
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cache_frames = max(2, cache_frames)
        if not self.path.is_file():
            raise VideoFileError(f"video file not found: {path}")
        try:
            self._container = av.open(str(path), "r")
        except (av.error.FFmpegError, OSError) as e:
            raise VideoFileError(f"{path}: not a readable video (truncated?): {_reason(e)}") from e
        try:
            self._open()
        except VideoFileError:
            self._container.close()
            raise

    def _open(self) -> None:
        """Index the opened file's first video stream and decode its first frame."""
        if not self._container.streams.video:
            raise VideoFileError(f"{self.name}: holds no video stream")
        self._stream = self._container.streams.video[0]
        self.time_base = self._stream.time_base or fractions.Fraction(1, 1)
        self.pts, self._keyframe = self._index()
        self.timestamps = np.asarray([float(p * self.time_base) for p in self.pts.tolist()], np.float64)
        self._index_of = {int(p): i for i, p in enumerate(self.pts.tolist())}
        # Presentation index of the latest keyframe at or before each frame.
        self._keyframe_before = np.maximum.accumulate(np.where(self._keyframe, np.arange(self.num_frames), 0))
        # The decoder's frames from where it stands, and the latest it produced (-1: none yet).
        self._decoded: Iterator[tuple[int, av.VideoFrame]] | None = None
        self._position = -1
        context = self._stream.codec_context
        if not (context.height and context.width):
            raise VideoFileError(f"{self.name}: the video stream records no frame size")
        self._coded_size = (int(context.height), int(context.width))
        self.video_size = self.frame(0).shape[:2]  # turned by the display rotation

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        """One demux pass: every frame's pts and keyframe flag, in presentation order. Refuses a file
        that ends inside a frame or holds fewer frames than its header declares (truncated)."""
        declared = self._stream.frames  # 0 where the container does not record it
        stamps: list[tuple[int, bool]] = []
        try:
            for packet in self._container.demux(self._stream):
                if packet.size == 0:
                    continue  # the demuxer's end-of-stream marker
                if packet.is_discard:
                    continue  # decoded only as a reference, never shown (an edit list's preroll)
                if packet.is_corrupt:
                    self._refuse_truncated(len(stamps), declared, "the file ends inside it")
                pts = packet.pts if packet.pts is not None else packet.dts
                if pts is None:
                    raise VideoFileError(f"{self.name}: frame {len(stamps)} has no timestamp; remux the file")
                stamps.append((int(pts), bool(packet.is_keyframe)))
        except av.error.FFmpegError as e:
            self._refuse_truncated(len(stamps), declared, f"reading stops there: {_reason(e)}")
        if declared and len(stamps) < declared:
            self._refuse_truncated(len(stamps), declared, "the file ends before it")
        if not stamps:
            raise VideoFileError(f"{self.name}: the video stream holds no frames (is the file truncated?)")
        stamps.sort()
        pts = np.asarray([p for p, _ in stamps], np.int64)
        if len(np.unique(pts)) != len(pts):
            raise VideoFileError(f"{self.name}: several frames share one timestamp; remux the file")
        keyframe = np.asarray([k for _, k in stamps], bool)
        keyframe[0] = True  # where decoding from the start begins, keyframe or not
        return pts, keyframe

    def _refuse_truncated(self, frame: int, declared: int, why: str) -> None:
        of = f" of {declared}" if declared else ""
        raise VideoFileError(f"{self.name}: frame {frame}{of} cannot be read: {why} (is the file truncated?)")

    @property
    def num_frames(self) -> int:
        return len(self.pts)

    def frame(self, i: int) -> np.ndarray:
        """Frame `i` (presentation order) as RGB uint8 `[H, W, 3]`."""
        if not 0 <= i < self.num_frames:
            raise VideoFileError(f"{self.name}: frame {i} outside its {self.num_frames} frames")
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        forward = self._decoded is not None and self._position < i
        if not (forward and self._keyframe_before[i] <= self._position + 1):
            self._seek(i)
        for index, frame in self._decoded:
            self._position = index
            self._remember(index, _rgb(frame, self._coded_size))
            if index >= i:
                break
        if self._position != i:
            self._decoded = None
            raise VideoFileError(
                f"{self.name}: frame {i} of {self.num_frames} cannot be decoded: the decoder gave no frame "
                f"at {self.timestamps[i]:.3f} s (is the file corrupt or truncated?)"
            )
        return self._cache[i]

    def _seek(self, i: int) -> None:
        """Position the decoder at a keyframe at or before frame `i`. The container seeks by frame
        i's timestamp; some demuxers land a keyframe early (slower, still right), and one that lands
        past frame i is sent back to the start."""
        for target in (i, 0):
            self._container.seek(int(self.pts[target]), stream=self._stream, backward=True, any_frame=False)
            decoded = self._decode()
            first = next(decoded, None)
            if first is None or first[0] <= i:
                break
        self._decoded = decoded if first is None else itertools.chain([first], decoded)
        self._position = -1

    def _decode(self) -> Iterator[tuple[int, av.VideoFrame]]:
        """(frame index, decoded frame) from the container's position on, from its first keyframe
        (frames before it lack their references); a packet the decoder refuses is an error naming
        its frame."""
        started = False
        for packet in self._container.demux(self._stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                self._decoded = None
                frame = self._index_of.get(packet.pts if packet.pts is not None else -1)
                which = f"frame {frame}" if frame is not None else "a frame"
                raise VideoFileError(
                    f"{self.name}: {which} of {self.num_frames} cannot be decoded: {_reason(e)} "
                    "(is the file corrupt or truncated?)"
                ) from e
            for frame in frames:
                index = self._index_of.get(frame.pts if frame.pts is not None else frame.dts)
                started = started or (index is not None and (frame.key_frame or index == 0))
                if started and index is not None:
                    yield index, frame

    def _remember(self, index: int, image: np.ndarray) -> None:
        self._cache[index] = image
        self._cache.move_to_end(index)
        while len(self._cache) > self._cache_frames:
            self._cache.popitem(last=False)

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StreamFrame(NamedTuple):
    """One frame of a live stream: RGB uint8 `[H, W, 3]` and its presentation time in seconds (None
    where the stream carries no timestamps, e.g. raw MJPEG)."""

    image: np.ndarray
    time: float | None


def stream_frames(source: str | BinaryIO, name: str, format: str | None = None) -> Iterator[StreamFrame]:
    """The frames of a live stream, one at a time as they arrive, until it ends.

    source: a binary file object (a pipe such as `sys.stdin.buffer` carrying a container FFmpeg
    demuxes without seeking: NUT, Matroska, MPEG-TS, MJPEG, ...) or a path: a capture device
    `/dev/video*` (or a link to one) is read through Video4Linux2 unless `format` names another
    input format; another path (a named pipe, /dev/stdin) as FFmpeg finds it. name: what
    errors call the stream. Frames take the first frame's size.
    """
    if format is None and isinstance(source, str) and os.path.realpath(source).startswith("/dev/video"):
        format = "v4l2"
    try:
        container = av.open(source, "r", format=format)
    except (av.error.FFmpegError, OSError) as e:
        raise VideoFileError(f"{name}: not a readable video stream: {_reason(e)}") from e
    with container:
        if not container.streams.video:
            raise VideoFileError(f"{name}: holds no video stream")
        stream = container.streams.video[0]
        size = None
        count = 0
        try:
            for frame in container.decode(stream):
                size = size or (frame.height, frame.width)
                time = None if frame.pts is None else float(frame.pts * stream.time_base)
                yield StreamFrame(_rgb(frame, size), time)
                count += 1
        except av.error.FFmpegError as e:
            raise VideoFileError(f"{name}: frame {count} cannot be decoded: {_reason(e)}") from e


class VideoWriter:
    """An H.264 .mp4 (libx264, yuv420p) written a frame at a time.

    Frames are placed at the times `write` is given (seconds, rounded to `time_base`; give a source
    file's time base to keep its timestamps exactly, variable frame rate included); a frame without
    a time comes 1 / `fps` after the one before (the first at 0). yuv420p needs an even width and height: an odd one gets its last row or column
    repeated. A VideoFileError names the file when it cannot be written.
    """

    def __init__(self, path: str | Path, fps: float = 24.0, time_base: fractions.Fraction | None = None):
        self.path = Path(path)
        self.fps = fractions.Fraction(fps).limit_denominator(1001)
        self.time_base = time_base or 1 / self.fps
        self._stream = None
        self._count = 0
        self._last_pts = None
        try:
            self._container = av.open(str(path), "w", format="mp4")
        except (av.error.FFmpegError, OSError) as e:
            raise VideoFileError(f"{path}: cannot be written: {_reason(e)}") from e

    def write(self, image: np.ndarray, time: float | None = None) -> None:
        """Append frame `image` `[H, W, 3]` uint8 RGB, shown from `time` seconds (default: 1 / fps
        after the frame before). Times must increase."""
        h, w = image.shape[:2]
        image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if time is not None:
            pts = round(time / self.time_base)
        elif self._last_pts is None:
            pts = 0
        else:
            pts = self._last_pts + max(1, round(1 / (self.fps * self.time_base)))
        if self._last_pts is not None and pts <= self._last_pts:
            raise VideoFileError(
                f"{self.path}: frame {self._count} at {time} s is not after the frame before it"
            )
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts, frame.time_base = pts, self.time_base
        try:
            if self._stream is None:
                self._stream = self._container.add_stream("libx264", rate=self.fps)
                self._stream.width, self._stream.height = image.shape[1], image.shape[0]
                self._stream.pix_fmt = "yuv420p"
                self._stream.codec_context.time_base = self.time_base
                self._stream.time_base = self.time_base
            self._mux(self._stream.encode(frame))
        except (av.error.FFmpegError, OSError) as e:
            raise VideoFileError(f"{self.path}: frame {self._count} cannot be written: {_reason(e)}") from e
        self._count += 1
        self._last_pts = pts

    def _mux(self, packets) -> None:
        for packet in packets:
            self._container.mux(packet)

    def close(self) -> None:
        """Flush the encoder and finish the file."""
        try:
            if self._stream is not None:
                self._mux(self._stream.encode(None))
            self._container.close()
        except (av.error.FFmpegError, OSError) as e:
            raise VideoFileError(f"{self.path}: cannot be written: {_reason(e)}") from e

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
