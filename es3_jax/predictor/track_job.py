"""Tracking a whole video, or a live stream, from palette-mask prompts into files: the `es3 track` job.

A job reads its prompts (one palette PNG on one frame, or a folder of PNGs named by frame), tracks
with a `VideoPredictor`, and writes each frame's outputs as the frame is tracked (`TrackOutputs`):

    <output_dir>/masks/<frame>.png        DAVIS palette, object ids of the prompts
    <output_dir>/logits/<frame>.npz       per-object mask logits (`save_logits`)
    <output_dir>/overlay.mp4              the result over the frames (not for embeddings)
    <output_dir>/overlay.gif              folders and embeddings
    <output_dir>/overlay_grid.png         a sample of frames, the prompted ones first
"""

from __future__ import annotations

import contextlib
import dataclasses
import fractions
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from es3_jax import visualize
from es3_jax.data.embedding_store import EmbeddingStore
from es3_jax.data.masks import logits_to_ids, read_palette_png, write_palette_png
from es3_jax.data.video_file import VideoFile, VideoWriter, stream_frames
from es3_jax.predictor.frame_sources import FrameFolder, open_frames
from es3_jax.predictor.prompts import PredictorError
from es3_jax.predictor.session import State
from es3_jax.predictor.video_predictor import VideoPredictor


@dataclasses.dataclass(frozen=True)
class TrackJob:
    """What to track and where its outputs go.

    Exactly one of `frames` (a folder, a video file, `-` for stdin or a capture device `/dev/...`)
    and `embeddings` (a store, with `video` naming one of its videos) is the source. `mask` is one
    palette PNG prompted on `mask_frame`, or a folder of PNGs named like the frames they prompt.
    """

    mask: str
    output_dir: str
    frames: str | None = None
    embeddings: str | None = None
    video: str | None = None
    mask_frame: int = 0
    save_logits: bool = False
    reverse: bool = False
    grid_frames: int = 8
    fps: float = 24.0  # overlay.mp4's frame rate for frames without times (folders)
    max_frames: int | None = None  # a stream or a device stops after this many frames

    @property
    def is_stream(self) -> bool:
        """stdin or a capture device: tracked as its frames arrive."""
        return self.frames is not None and (self.frames == "-" or self.frames.startswith("/dev/"))


@dataclasses.dataclass(frozen=True)
class TrackReport:
    objects: set[int]  # the prompted object ids
    frames: int  # frames tracked and written
    written: list[str]  # what was written, as paths or globs


class TrackOutputs:
    """Writes each tracked frame's outputs under the output folder as the frame comes: its mask
    PNG, its logits, its overlay in overlay.mp4 (and overlay.gif), and keeps the grid's frames."""

    def __init__(self, job: TrackJob, prompt_frames: set[int], overlay: dict | None, gif: bool):
        """overlay: VideoWriter's keywords for overlay.mp4 (None: no overlay.mp4)."""
        self.out = Path(job.output_dir)
        self.save_logits = job.save_logits
        (self.out / "masks").mkdir(parents=True, exist_ok=True)
        if self.save_logits:
            (self.out / "logits").mkdir(parents=True, exist_ok=True)
        self.video = None if overlay is None else VideoWriter(self.out / "overlay.mp4", **overlay)
        self.gif: list[np.ndarray] | None = [] if gif else None
        self.grid = visualize.GridSample(job.grid_frames, prompt_frames)
        self.count = 0

    def add(
        self,
        frame_idx: int,
        name: str,
        obj_ids: Iterable[int],
        logits: np.ndarray,
        picture: np.ndarray,
        time: float | None = None,
    ) -> None:
        """logits `[O, H, W]` of the objects `obj_ids` on frame `frame_idx` (named `name`), shown over
        `picture` `[H, W, 3]` uint8, at `time` seconds in overlay.mp4 (None: the next at the job's fps)."""
        obj_ids = list(obj_ids)
        ids = logits_to_ids(logits, obj_ids)
        write_palette_png(self.out / "masks" / f"{name}.png", ids)
        if self.save_logits:
            np.savez_compressed(
                self.out / "logits" / f"{name}.npz", logits=logits, obj_ids=np.asarray(obj_ids)
            )
        over = visualize.overlay(picture, ids)
        if self.video is not None:
            self.video.write(over, time)
        if self.gif is not None:
            self.gif.append(over)
        self.grid.offer(frame_idx, over)
        self.count += 1

    def finish(self, names: Callable[[int], str]) -> list[str]:
        """Close overlay.mp4, write the grid (and the GIF) -> what was written."""
        written = [f"{self.out}/masks/*.png"]
        order = self.grid.frames()
        if order:
            picture = visualize.grid(
                [self.grid.pictures[f] for f in order], labels=[f"frame {names(f)}" for f in order]
            )
            Image.fromarray(picture).save(self.out / "overlay_grid.png")
            written.append(f"{self.out}/overlay_grid.png")
        if self.video is not None:
            self.video.close()
            if self.count:
                written.append(f"{self.out}/overlay.mp4")
        if self.gif:
            visualize.save_gif(self.out / "overlay.gif", self.gif)
            written.append(f"{self.out}/overlay.gif")
        return written


def open_video(job: TrackJob) -> VideoFile | FrameFolder | None:
    """A folder's frames or a video file, opened and checked (frame sizes, a file's index) before
    any weights load; None for a stream or an embedding store."""
    if job.frames == "-" and sys.stdin.isatty():
        raise PredictorError(
            "--frames - reads a video piped to stdin (e.g. ffmpeg -i INPUT -f nut - | es3 track --frames - ...)"
        )
    if job.frames is None or job.is_stream:
        return None
    return open_frames(job.frames)


def track(
    job: TrackJob, predictor: VideoPredictor, video: VideoFile | FrameFolder | None = None
) -> TrackReport:
    """Run `job` with `predictor`; `video` is `open_video(job)` when the caller opened it already."""
    if job.is_stream:
        return _track_stream(job, predictor)
    if job.frames is not None and video is None:
        video = open_video(job)
    return _track_video(job, predictor, video)


def prompt_files(mask: str, mask_frame: int, frame_of: Callable[[str], int | None]) -> list[tuple[int, Path]]:
    """(frame index, PNG) of each prompt, sorted: the PNG `mask` on `mask_frame`, or the PNGs of a
    folder `mask` on the frames they are named after. frame_of(stem) -> the frame index, or None."""
    mask_path = Path(mask)
    if not mask_path.is_dir():
        return [(mask_frame, mask_path)]
    prompts = []
    for png in sorted(mask_path.glob("*.png")):
        frame_idx = frame_of(png.stem)
        if frame_idx is None:
            raise PredictorError(f"{png}: no frame named {png.stem} in the video")
        prompts.append((frame_idx, png))
    if not prompts:
        raise PredictorError(f"{mask_path}: no .png masks in this folder")
    return sorted(prompts)


def _add_prompt(
    predictor: VideoPredictor, state: State, frame_idx: int, png: Path, ids: np.ndarray
) -> list[int]:
    """Prompt every object of `ids` `[h, w]` (the palette PNG `png`) on frame `frame_idx` -> their ids."""
    if ids.shape != tuple(state.video_size):
        # Upstream's predictors resize a prompt of another size too; a PNG of another
        # resolution than the frames is often a mistake, so say so.
        print(
            f"es3 track: warning: {png} is {ids.shape[1]}x{ids.shape[0]} (width x height) but the frames "
            f"are {state.video_size[1]}x{state.video_size[0]}; the mask is resized to them",
            file=sys.stderr,
        )
    present = [int(i) for i in np.unique(ids) if i != 0]
    if not present:
        print(f"es3 track: {png} holds no object; skipped", file=sys.stderr)
    for obj_id in present:
        predictor.add_new_mask(state, frame_idx, obj_id, ids == obj_id)
    return present


def _track_video(
    job: TrackJob, predictor: VideoPredictor, video: VideoFile | FrameFolder | None
) -> TrackReport:
    """A folder, a video file or a video of the embedding store, tracked with `propagate_in_video`."""
    if isinstance(video, VideoFile):
        stems = [f"{i:05d}" for i in range(video.num_frames)]
        state = predictor.init_state(video)
        picture = video.frame
    elif video is not None:
        stems = [p.stem for p in video.paths]
        state = predictor.init_state(job.frames)

        def picture(i: int) -> np.ndarray:
            with Image.open(video.paths[i]) as im:
                return np.asarray(im.convert("RGB"))

    else:
        if not job.video:
            raise PredictorError("--embeddings needs --video ID")
        store = EmbeddingStore(job.embeddings)
        state = predictor.init_state((store, job.video))
        stems = list(store.metadata(job.video)["frame_names"])
        h, w = state.video_size

        def picture(i: int) -> np.ndarray:
            return np.full((h, w, 3), 96, np.uint8)

    if not Path(job.mask).is_dir() and not 0 <= job.mask_frame < len(stems):
        raise PredictorError(f"--mask_frame {job.mask_frame} outside the video's {len(stems)} frames")
    index = {stem: i for i, stem in enumerate(stems)}
    prompts = prompt_files(job.mask, job.mask_frame, index.get)
    objects = set()
    for frame_idx, png in prompts:
        objects.update(_add_prompt(predictor, state, frame_idx, png, read_palette_png(png)))
    if not objects:
        raise PredictorError(f"{job.mask}: no object ids in the prompt mask(s)")

    overlay = None
    if isinstance(video, VideoFile):
        # The source's own frame times (a variable frame rate kept), in its own time base.
        overlay = {"time_base": video.time_base, "fps": job.fps}
    elif video is not None:
        overlay = {"fps": job.fps}
    outputs = TrackOutputs(job, {f for f, _ in prompts}, overlay, gif=not isinstance(video, VideoFile))
    start = min(f for f, _ in prompts) if not job.reverse else max(f for f, _ in prompts)
    for frame_idx, obj_ids, logits in tqdm(
        predictor.propagate_in_video(state, start_frame_idx=start, reverse=job.reverse),
        total=len(stems),
        desc="track",
        disable=not sys.stderr.isatty(),
    ):
        time = None
        if isinstance(video, VideoFile):
            # Backwards, the source's frame intervals in reverse, from the prompted frame's time.
            times = video.timestamps
            time = float(times[start] + abs(times[frame_idx] - times[start]))
        outputs.add(frame_idx, stems[frame_idx], obj_ids, logits, picture(frame_idx), time)
    return TrackReport(objects, outputs.count, outputs.finish(lambda f: stems[f]))


def _track_stream(job: TrackJob, predictor: VideoPredictor) -> TrackReport:
    """stdin or a capture device, tracked frame by frame with the streaming predictor: each frame's
    outputs are written as it arrives. Frames before the first prompt get empty masks."""
    if job.reverse:
        raise PredictorError("--reverse needs the whole video (a folder or a file), not a stream")
    if job.mask_frame < 0:
        raise PredictorError(f"--mask_frame {job.mask_frame}: a stream's frames are numbered from 0")
    prompts = prompt_files(job.mask, job.mask_frame, lambda stem: int(stem) if stem.isdigit() else None)
    masks = {png: read_palette_png(png) for _, png in prompts}  # a bad PNG is named before the stream opens
    name = "stdin" if job.frames == "-" else job.frames
    # The stream's own frame times from its first frame on; 1/90000 s is the MPEG clock.
    overlay = {"fps": job.fps, "time_base": fractions.Fraction(1, 90000)}
    outputs = TrackOutputs(job, {f for f, _ in prompts}, overlay, gif=False)
    objects: set[int] = set()
    state, start, last = None, None, None
    frames = stream_frames(sys.stdin.buffer if job.frames == "-" else job.frames, name)
    try:
        with contextlib.closing(frames):
            for image, time in frames:
                if state is None:
                    state = predictor.init_stream()
                frame_idx = predictor.add_frame(state, image)
                for _, png in (p for p in prompts if p[0] == frame_idx):
                    objects.update(_add_prompt(predictor, state, frame_idx, png, masks[png]))
                frame_idx, obj_ids, logits = predictor.track_frame(state)  # no object yet: [0, H, W]
                shown = None
                if time is not None and (last is None or time > last):
                    start = time if start is None else start
                    shown, last = time - start, time
                outputs.add(frame_idx, f"{frame_idx:05d}", obj_ids, logits, image, shown)
                if outputs.count == job.max_frames:
                    break
    except KeyboardInterrupt:
        print(f"es3 track: stopped (Ctrl-C) after {outputs.count} frames", file=sys.stderr)
    finally:
        written = outputs.finish(lambda f: f"{f:05d}")  # what came so far, playable
    waiting = [f for f, _ in prompts if f >= outputs.count]
    if waiting:
        raise PredictorError(
            f"{name}: the stream ended after {outputs.count} frames, before the prompt on frame {waiting[0]}"
        )
    if not objects:
        raise PredictorError(f"{job.mask}: no object ids in the prompt mask(s)")
    return TrackReport(objects, outputs.count, written)
