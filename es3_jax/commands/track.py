"""`es3 track`: track objects through a video from a mask prompt."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from es3_jax.commands.common import add_config_args

if TYPE_CHECKING:
    import numpy as np

HELP = "track objects through a video from a palette-mask prompt"
DESCRIPTION = """\
Track the objects of a palette mask PNG (object ids 1..255) through a video: a folder of frames, a
video file (.mp4, .webm, .mov, .mkv, .avi), a live stream on stdin (--frames -: a container FFmpeg
reads from a pipe, e.g. `ffmpeg ... -f nut -`), a capture device (--frames /dev/video0), or
pre-computed trunk embeddings (--embeddings STORE --video ID).

--mask is one PNG (prompted on --mask_frame) or a folder of PNGs named like the frames
(00005.png prompts frame 00005; a video file's or a stream's frames are named by their index,
00000, 00001, ...): objects that first appear on later frames join there.
A mask whose size differs from the frames is resized as upstream does. The frames must all have
one size (the masks are written at it): a frame of another size is refused before tracking.

Folders, files and embeddings are tracked as a whole (forwards, or --reverse from the prompted
frame); a stream or a device is tracked as its frames arrive, each frame's mask written at once,
until the stream ends, --max_frames, or Ctrl-C.

Writes <output_dir>/masks/<frame>.png (DAVIS palette), <output_dir>/overlay_grid.png,
<output_dir>/overlay.mp4 (the result over the frames, H.264, at a video file's or a stream's own
frame times, a folder's at --fps; none for embeddings, which hold no pictures),
<output_dir>/overlay.gif for folders and embeddings, and with --save_logits the per-object mask
logits as <output_dir>/logits/<frame>.npz.

Examples:
  es3 track --checkpoint sam3.pt --frames video/ --mask first_frame.png --output_dir out/
  es3 track --checkpoint sam3.pt --frames clip.mp4 --mask first_frame.png --output_dir out/
  ffmpeg -i rtsp://camera/stream -f nut - | es3 track --checkpoint sam3.pt --frames - \\
      --mask first_frame.png --output_dir out/"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", default=None, help="sam3.pt or an es3 weights folder (default: random weights)"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--frames",
        default=None,
        help="folder of video frames (sorted by integer stem), a video file, - (a stream on stdin) or a "
        "capture device (/dev/video0)",
    )
    source.add_argument("--embeddings", default=None, help="embedding store of pre-computed trunk features")
    p.add_argument("--video", default=None, help="video id inside --embeddings")
    p.add_argument("--mask", required=True, help="palette mask PNG, or a folder of them named by frame")
    p.add_argument("--mask_frame", type=int, default=0, help="frame index a single --mask PNG prompts")
    p.add_argument("--output_dir", required=True, help="where masks, logits and pictures go")
    p.add_argument("--save_logits", action="store_true", help="also write per-object mask logits (.npz)")
    p.add_argument("--reverse", action="store_true", help="track backwards from the prompted frame")
    p.add_argument("--memory", default="auto", choices=("auto", "teacher", "student"), help="memory path")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights (no --checkpoint)")
    p.add_argument("--grid_frames", type=int, default=8, help="frames shown in overlay_grid.png")
    p.add_argument(
        "--fps", type=float, default=24.0, help="overlay.mp4's frame rate for frames without times (folders)"
    )
    p.add_argument(
        "--max_frames", type=int, default=None, help="stop a stream or a device after this many frames"
    )
    p.add_argument(
        "--objects_per_batch",
        type=int,
        default=None,
        help="track the objects in batches of this many, which bounds device memory for many objects (none: all at once)",
    )
    add_config_args(p)


def _is_stream(frames: str) -> bool:
    return frames == "-" or frames.startswith("/dev/")


class _Results:
    """Writes each tracked frame's outputs under the output folder as the frame comes: its mask
    PNG, its logits, its overlay in overlay.mp4 (and overlay.gif), and keeps the grid's frames."""

    def __init__(self, args: argparse.Namespace, prompt_frames: set[int], overlay: dict | None, gif: bool):
        """overlay: VideoWriter's keywords for overlay.mp4 (None: no overlay.mp4)."""
        from es3_jax import visualize
        from es3_jax.data.video_file import VideoWriter

        self.out = Path(args.output_dir)
        self.save_logits = args.save_logits
        (self.out / "masks").mkdir(parents=True, exist_ok=True)
        if self.save_logits:
            (self.out / "logits").mkdir(parents=True, exist_ok=True)
        self.video = None if overlay is None else VideoWriter(self.out / "overlay.mp4", **overlay)
        self.gif: list[np.ndarray] | None = [] if gif else None
        self.grid = visualize.GridSample(args.grid_frames, prompt_frames)
        self.count = 0

    def add(self, frame_idx: int, name: str, obj_ids, logits, picture, time: float | None = None) -> None:
        """logits `[O, H, W]` of the objects `obj_ids` on frame `frame_idx` (named `name`), shown over
        `picture` `[H, W, 3]` uint8, at `time` seconds in overlay.mp4 (None: the next at --fps)."""
        import numpy as np

        from es3_jax import visualize
        from es3_jax.data.masks import logits_to_ids, write_palette_png

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

    def finish(self, names) -> list[str]:
        """Close overlay.mp4, write the grid (and the GIF) -> what was written, for the summary."""
        from PIL import Image

        from es3_jax import visualize

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


def _prompts(mask: str, mask_frame: int, frame_of) -> list[tuple[int, Path]]:
    """(frame index, PNG) of each prompt: the --mask PNG on --mask_frame, or the PNGs of a --mask
    folder on the frames they are named after. frame_of(stem) -> the frame index, or None."""
    from es3_jax.predictor import PredictorError as TrackError

    mask_path = Path(mask)
    if not mask_path.is_dir():
        return [(mask_frame, mask_path)]
    prompts = []
    for png in sorted(mask_path.glob("*.png")):
        frame_idx = frame_of(png.stem)
        if frame_idx is None:
            raise TrackError(f"{png}: no frame named {png.stem} in the video")
        prompts.append((frame_idx, png))
    if not prompts:
        raise TrackError(f"{mask_path}: no .png masks in this folder")
    return sorted(prompts)


def _add_prompt(predictor, state, frame_idx: int, png: Path, ids: np.ndarray) -> list[int]:
    """Prompt every object of `ids` `[h, w]` (the palette PNG `png`) on frame `frame_idx` -> their ids."""
    import sys

    import numpy as np

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


def run(args: argparse.Namespace) -> int:
    import sys

    from es3_jax.predictor import PredictorError as TrackError
    from es3_jax.predictor import VideoPredictor
    from es3_jax.predictor.frame_sources import open_frames

    # What can be checked without the weights is, before they load: a folder's frames and their
    # sizes, a video file's index (a truncated file is refused here).
    video = None
    if args.frames and not _is_stream(args.frames):
        video = open_frames(args.frames)
    if args.frames == "-" and sys.stdin.isatty():
        raise TrackError(
            "--frames - reads a video piped to stdin (e.g. ffmpeg -i INPUT -f nut - | es3 track --frames - ...)"
        )
    predictor = VideoPredictor.from_checkpoint(
        args.checkpoint,
        config=args.config,
        overrides=args.overrides,
        seed=args.seed,
        memory=args.memory,
        objects_per_batch=args.objects_per_batch,
    )
    if args.checkpoint is None:
        print("es3 track: no --checkpoint: random weights (a smoke run, not a real tracker)", file=sys.stderr)
    if args.frames and _is_stream(args.frames):
        objects, count, written = _track_stream(args, predictor)
    else:
        objects, count, written = _track_video(args, predictor, video)
    timings = {k: round(v, 1) for k, v in predictor.timings.items()}
    print(f"tracked {len(objects)} object(s) over {count} frames: {timings}")
    print(f"wrote {', '.join(written)}")
    return 0


def _track_video(args: argparse.Namespace, predictor, video) -> tuple[set[int], int, list[str]]:
    """A folder, a video file or a video of the embedding store, tracked with `propagate_in_video`."""
    import sys

    import numpy as np
    from tqdm import tqdm

    from es3_jax.data.masks import read_palette_png
    from es3_jax.data.video_file import VideoFile
    from es3_jax.predictor import PredictorError as TrackError

    if isinstance(video, VideoFile):
        stems = [f"{i:05d}" for i in range(video.num_frames)]
        state = predictor.init_state(video)

        def picture(i: int) -> np.ndarray:
            return video.frame(i)

    elif video is not None:
        stems = [p.stem for p in video.paths]
        state = predictor.init_state(args.frames)

        def picture(i: int) -> np.ndarray:
            from PIL import Image

            with Image.open(video.paths[i]) as im:
                return np.asarray(im.convert("RGB"))

    else:
        if not args.video:
            raise TrackError("--embeddings needs --video ID")
        from es3_jax.data.embedding_store import EmbeddingStore

        store = EmbeddingStore(args.embeddings)
        state = predictor.init_state((store, args.video))
        stems = list(store.metadata(args.video)["frame_names"])
        h, w = state.video_size

        def picture(i: int) -> np.ndarray:
            return np.full((h, w, 3), 96, np.uint8)

    if not Path(args.mask).is_dir() and not 0 <= args.mask_frame < len(stems):
        raise TrackError(f"--mask_frame {args.mask_frame} outside the video's {len(stems)} frames")
    index = {stem: i for i, stem in enumerate(stems)}
    prompts = _prompts(args.mask, args.mask_frame, index.get)
    objects = set()
    for frame_idx, png in prompts:
        objects.update(_add_prompt(predictor, state, frame_idx, png, read_palette_png(png)))
    if not objects:
        raise TrackError(f"{args.mask}: no object ids in the prompt mask(s)")

    overlay = None
    if isinstance(video, VideoFile):
        # The source's own frame times (a variable frame rate kept), in its own time base.
        overlay = {"time_base": video.time_base, "fps": args.fps}
    elif video is not None:
        overlay = {"fps": args.fps}
    results = _Results(args, {f for f, _ in prompts}, overlay, gif=not isinstance(video, VideoFile))
    start = min(f for f, _ in prompts) if not args.reverse else max(f for f, _ in prompts)
    for frame_idx, obj_ids, logits in tqdm(
        predictor.propagate_in_video(state, start_frame_idx=start, reverse=args.reverse),
        total=len(stems),
        desc="track",
        disable=not sys.stderr.isatty(),
    ):
        time = None
        if isinstance(video, VideoFile):
            # Backwards, the source's frame intervals in reverse, from the prompted frame's time.
            times = video.timestamps
            time = float(times[start] + abs(times[frame_idx] - times[start]))
        results.add(frame_idx, stems[frame_idx], obj_ids, logits, picture(frame_idx), time)
    return objects, results.count, results.finish(lambda f: stems[f])


def _track_stream(args: argparse.Namespace, predictor) -> tuple[set[int], int, list[str]]:
    """stdin or a capture device, tracked frame by frame with the streaming predictor: each frame's
    outputs are written as it arrives. Frames before the first prompt get empty masks."""
    import contextlib
    import fractions
    import sys

    from es3_jax.data.masks import read_palette_png
    from es3_jax.data.video_file import stream_frames
    from es3_jax.predictor import PredictorError as TrackError

    if args.reverse:
        raise TrackError("--reverse needs the whole video (a folder or a file), not a stream")
    if args.mask_frame < 0:
        raise TrackError(f"--mask_frame {args.mask_frame}: a stream's frames are numbered from 0")
    prompts = _prompts(args.mask, args.mask_frame, lambda stem: int(stem) if stem.isdigit() else None)
    masks = {png: read_palette_png(png) for _, png in prompts}  # a bad PNG is named before the stream opens
    name = "stdin" if args.frames == "-" else args.frames
    # The stream's own frame times from its first frame on; 1/90000 s is the MPEG clock.
    overlay = {"fps": args.fps, "time_base": fractions.Fraction(1, 90000)}
    results = _Results(args, {f for f, _ in prompts}, overlay, gif=False)
    objects: set[int] = set()
    state, start, last = None, None, None
    frames = stream_frames(sys.stdin.buffer if args.frames == "-" else args.frames, name)
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
                results.add(frame_idx, f"{frame_idx:05d}", obj_ids, logits, image, shown)
                if results.count == args.max_frames:
                    break
    except KeyboardInterrupt:
        print(f"es3 track: stopped (Ctrl-C) after {results.count} frames", file=sys.stderr)
    finally:
        written = results.finish(lambda f: f"{f:05d}")  # what came so far, playable
    waiting = [f for f, _ in prompts if f >= results.count]
    if waiting:
        raise TrackError(
            f"{name}: the stream ended after {results.count} frames, before the prompt on frame {waiting[0]}"
        )
    if not objects:
        raise TrackError(f"{args.mask}: no object ids in the prompt mask(s)")
    return objects, results.count, written
