"""`es3 make-synthetic`: write a small SA-V-format dataset of generated videos, or an SA-1B-format one
of generated images."""

from __future__ import annotations

import argparse

HELP = (
    "write synthetic SA-V-format videos (JPEG frames + <video>_manual.json) or SA-1B-format images "
    "(sa_<id>.jpg + sa_<id>.json) for demos and tests"
)
DESCRIPTION = """\
Generate moving, rotating, occluding textured shapes on textured backgrounds.

--layout sav (default): videos with objects entering and leaving, in the SA-V extracted-frames layout

  <output_dir>/syn_000000/00000.jpg, 00004.jpg, ...   (named by the 24-fps frame index)
  <output_dir>/syn_000000_manual.json                  (COCO-RLE masklets, SA-V fields)

Train on them with `DATA.SAV_ROOT <output_dir>`.

--layout sa1b: still images of 3-8 shapes in the SA-1B layout

  <output_dir>/sa_1.jpg, sa_1.json, sa_2.jpg, ...      (SA-1B fields: COCO-RLE masks with areas, boxes,
                                                        predicted IoU and stability scores)

annotated with each object's visible mask, a half of one or two objects, a speck of a few pixels and
the background. The same --seed always writes the same files."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output_dir", required=True, help="dataset folder to write (created if needed)")
    p.add_argument(
        "--layout",
        choices=("sav", "sa1b"),
        default="sav",
        help="sav: SA-V videos (default); sa1b: SA-1B images",
    )
    p.add_argument("--videos", type=int, default=8, help="number of videos (sav), or of images (sa1b)")
    p.add_argument(
        "--images", type=int, help="number of images, --layout sa1b only (another name for --videos)"
    )
    p.add_argument(
        "--frames", type=int, default=24, help="annotated frames per video (every 4th 24-fps frame)"
    )
    p.add_argument("--height", type=int, default=240, help="frame height in pixels")
    p.add_argument("--width", type=int, default=320, help="frame width in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator")
    p.add_argument("--flat", action="store_true", help="objects in one flat colour each, no texture")
    p.add_argument(
        "--area",
        type=float,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="range of an object's full area, as a fraction of the frame (default 0.03 0.2; an "
        "SA-1B image of N > 4 objects draws them at 4/N of it)",
    )


def run(args: argparse.Namespace) -> int:
    from es3_jax.data import synthetic
    from es3_jax.errors import Es3Error

    if args.images is not None and args.layout != "sa1b":
        raise Es3Error("--images is for --layout sa1b; SA-V videos are counted by --videos")
    count = args.images if args.images is not None else args.videos
    if count < 1 or args.frames < 1 or min(args.height, args.width) < 16:
        raise Es3Error(
            "--videos / --images and --frames must be at least 1, --height and --width at least 16"
        )
    default = synthetic.Style()
    lo, hi = args.area or (default.min_area, default.max_area)
    if not 0 < lo <= hi < 1:
        raise Es3Error(f"--area {lo} {hi}: need 0 < MIN <= MAX < 1")
    style = synthetic.Style(textured=not args.flat, min_area=lo, max_area=hi)
    size = f"{args.height}x{args.width}"
    if args.layout == "sa1b":
        names = synthetic.make_sa1b(
            args.output_dir,
            count,
            seed=args.seed,
            height=args.height,
            width=args.width,
            style=style,
            progress=True,
        )
        print(f"wrote {len(names)} SA-1B images ({size}) to {args.output_dir}")
        return 0
    names = synthetic.make_synthetic(
        args.output_dir,
        count,
        seed=args.seed,
        num_frames=args.frames,
        height=args.height,
        width=args.width,
        style=style,
        progress=True,
    )
    print(f"wrote {len(names)} videos of {args.frames} frames ({size}) to {args.output_dir}")
    return 0
