"""`es3 track`: track objects through a video from a mask prompt."""

from __future__ import annotations

import argparse

from es3_jax.commands.common import add_config_args

HELP = "track objects through a video from a palette-mask prompt"
DESCRIPTION = """\
Track the objects of a palette mask PNG (object ids 1..255) through a video of JPEG frames
(--frames) or of pre-computed trunk embeddings (--embeddings STORE --video ID).

--mask is one PNG (prompted on --mask_frame) or a folder of PNGs named like the frames
(00005.png prompts frame 00005): objects that first appear on later frames join there.
A mask whose size differs from the frames is resized as upstream does. The frames must all have
one size (the masks are written at it): a frame of another size is refused before tracking.

Writes <output_dir>/masks/<frame>.png (DAVIS palette), <output_dir>/overlay_grid.png and
<output_dir>/overlay.gif (the result over the frames), and with --save_logits the per-object
mask logits as <output_dir>/logits/<frame>.npz.

Example:
  es3 track --checkpoint sam3.pt --frames video/ --mask first_frame.png --output_dir out/"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", default=None, help="sam3.pt or an es3 weights folder (default: random weights)"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--frames", default=None, help="folder of video frames (sorted by integer stem)")
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
    add_config_args(p)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    import numpy as np
    from tqdm import tqdm

    from es3_jax import visualize
    from es3_jax.data.masks import logits_to_ids, read_palette_png, write_palette_png
    from es3_jax.predictor import PredictorError as TrackError
    from es3_jax.predictor import VideoPredictor
    from es3_jax.predictor.frame_sources import frame_size

    out = Path(args.output_dir)
    if args.frames:
        from es3_jax.data.frames import list_frames

        paths = list_frames(args.frames)
        frame_size(paths)  # frames of different sizes are refused before the weights load
    predictor = VideoPredictor.from_checkpoint(
        args.checkpoint, config=args.config, overrides=args.overrides, seed=args.seed, memory=args.memory
    )
    if args.checkpoint is None:
        print("es3 track: no --checkpoint: random weights (a smoke run, not a real tracker)", file=sys.stderr)
    stems: list[str]
    images = None
    if args.frames:
        stems = [p.stem for p in paths]
        state = predictor.init_state(args.frames)
        images = paths
    else:
        if not args.video:
            raise TrackError("--embeddings needs --video ID")
        from es3_jax.data.embedding_store import EmbeddingStore

        store = EmbeddingStore(args.embeddings)
        state = predictor.init_state((store, args.video))
        stems = list(store.metadata(args.video)["frame_names"])

    mask_path = Path(args.mask)
    prompts: list[tuple[int, Path]] = []
    if mask_path.is_dir():
        for png in sorted(mask_path.glob("*.png")):
            if png.stem not in stems:
                raise TrackError(f"{png}: no frame named {png.stem} in the video")
            prompts.append((stems.index(png.stem), png))
        if not prompts:
            raise TrackError(f"{mask_path}: no .png masks in this folder")
    else:
        if not 0 <= args.mask_frame < len(stems):
            raise TrackError(f"--mask_frame {args.mask_frame} outside the video's {len(stems)} frames")
        prompts.append((args.mask_frame, mask_path))
    objects = set()
    for frame_idx, png in sorted(prompts):
        ids = read_palette_png(png)
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
            objects.add(obj_id)
    if not objects:
        raise TrackError(f"{mask_path}: no object ids in the prompt mask(s)")

    (out / "masks").mkdir(parents=True, exist_ok=True)
    if args.save_logits:
        (out / "logits").mkdir(parents=True, exist_ok=True)
    start = min(f for f, _ in prompts) if not args.reverse else max(f for f, _ in prompts)
    shown: dict[int, np.ndarray] = {}
    every = max(1, len(stems) // max(1, args.grid_frames))
    gif_frames = []
    h, w = state.video_size
    for frame_idx, obj_ids, logits in tqdm(
        predictor.propagate_in_video(state, start_frame_idx=start, reverse=args.reverse),
        total=len(stems),
        desc="track",
        disable=not sys.stderr.isatty(),
    ):
        ids = logits_to_ids(logits, obj_ids)
        write_palette_png(out / "masks" / f"{stems[frame_idx]}.png", ids)
        if args.save_logits:
            np.savez_compressed(
                out / "logits" / f"{stems[frame_idx]}.npz", logits=logits, obj_ids=np.asarray(obj_ids)
            )
        if images is not None:
            from PIL import Image

            with Image.open(images[frame_idx]) as im:
                picture = np.asarray(im.convert("RGB"))
        else:
            picture = np.full((h, w, 3), 96, np.uint8)
        over = visualize.overlay(picture, ids)
        gif_frames.append(over)
        if frame_idx % every == 0 or frame_idx in {f for f, _ in prompts}:
            shown[frame_idx] = over
    order = sorted(shown)
    picture = visualize.grid([shown[f] for f in order], labels=[f"frame {stems[f]}" for f in order])
    from PIL import Image

    Image.fromarray(picture).save(out / "overlay_grid.png")
    visualize.save_gif(out / "overlay.gif", gif_frames)
    timings = {k: round(v, 1) for k, v in predictor.timings.items()}
    print(f"tracked {len(objects)} object(s) over {len(gif_frames)} frames: {timings}")
    print(f"wrote {out}/masks/*.png, {out}/overlay_grid.png, {out}/overlay.gif")
    return 0
