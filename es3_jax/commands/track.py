"""`es3 track`: track objects through a video from a mask prompt."""

from __future__ import annotations

import argparse
import sys

from es3_jax.commands.common import add_config_args

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


def run(args: argparse.Namespace) -> int:
    from es3_jax.predictor import VideoPredictor
    from es3_jax.predictor.track_job import TrackJob, open_video, track

    job = TrackJob(
        mask=args.mask,
        output_dir=args.output_dir,
        frames=args.frames,
        embeddings=args.embeddings,
        video=args.video,
        mask_frame=args.mask_frame,
        save_logits=args.save_logits,
        reverse=args.reverse,
        grid_frames=args.grid_frames,
        fps=args.fps,
        max_frames=args.max_frames,
    )
    # What can be checked without the weights is, before they load: a folder's frames and their
    # sizes, a video file's index (a truncated file is refused here).
    video = open_video(job)
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
    report = track(job, predictor, video)
    timings = {k: round(v, 1) for k, v in predictor.timings.items()}
    print(f"tracked {len(report.objects)} object(s) over {report.frames} frames: {timings}")
    print(f"wrote {', '.join(report.written)}")
    return 0
