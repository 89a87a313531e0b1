"""`es3 export`: merge the trained modules into a SAM3 (or stage-1) PyTorch checkpoint, or write the
tracker as static-shape ONNX graphs (`--format onnx`)."""

from __future__ import annotations

import argparse

import numpy as np

from es3_jax.commands.common import add_config_args
from es3_jax.errors import Es3Error, require_torch

HELP = "merge the trained student into a SAM3 / stage-1 PyTorch checkpoint, or write ONNX graphs"
DESCRIPTION = """\
Write the base checkpoint (--sam3_weights: Meta's sam3.pt or a stage-1 merged .pt) with the
teacher's memory attention (tracker.transformer.encoder.*) replaced by the student's, the
Perceiver Resampler added as tracker.spatial_perceiver.*, and the student's config recorded in
the file (ckpt['es3_config']; the metadata of a .safetensors). Every other key of the base is
kept byte for byte. A TRAIN.MODE finetune run's trained tracker modules replace the base's.

--stage2_weights: a run folder (its latest checkpoint), <run>/ckpt_best, <run>/ckpt_latest,
<run>/ckpt_step_N, or an es3 weights folder (<run>/weights). The config is the run's
config.yaml (or --config); a checkpoint that does not fit it is refused, naming each key.
The output is written to a temporary file beside it and renamed: never half-written; an output
location that cannot be written is refused before any of the work.

In PyTorch:
  from porting.torch_student import load_efficient_sam3
  predictor = load_efficient_sam3("efficient_sam3_full.pt")   # upstream Sam3TrackerPredictor API

Example:
  es3 export --stage2_weights output/stage2_memory/ckpt_best \\
      --sam3_weights sam3_checkpoints/sam3.pt --output_path output/efficient_sam3_full.pt

--format onnx writes the folder --output_path with the tracker as five ONNX graphs (image encoder,
mask prompt, click prompt, prompted frame's memory, tracking step), opset 18, every shape static:
--image_size, --objects (tracked together), --points (clicks per prompt; a box is 2) and
--cond_frames (prompted frames per object) fix them. --stage2_weights is then any weights es3
reads (a sam3.pt, a merged export, a run, an es3 weights folder), with the student's memory path
where it holds one (--memory). Example:
  es3 export --format onnx --stage2_weights output/efficient_sam3_full.pt --output_path output/onnx \\
      --objects 3
then track in numpy + onnxruntime with es3_jax.deploy.onnx_tracker.OnnxTracker("output/onnx")."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage2_weights", required=True, help="run folder, checkpoint or es3 weights folder")
    p.add_argument("--sam3_weights", help="base: sam3.pt or a stage-1 merged checkpoint (pt, safetensors)")
    p.add_argument("--output_path", required=True, help="merged checkpoint to write; a folder for onnx")
    p.add_argument(
        "--format",
        default="auto",
        choices=("auto", "pt", "safetensors", "onnx"),
        help="auto: from the suffix (.pt / .safetensors)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_path")
    onnx = p.add_argument_group("onnx")
    onnx.add_argument("--memory", default="auto", choices=("auto", "teacher", "student"))
    onnx.add_argument("--image_size", type=int, default=None, help="input side (default: the config's)")
    onnx.add_argument("--objects", type=int, default=1, help="objects tracked together (the bank's rows)")
    onnx.add_argument("--points", type=int, default=1, help="clicks per click prompt (a box is 2)")
    onnx.add_argument("--cond_frames", type=int, default=1, help="prompted frames per object in memory")
    onnx.add_argument("--opset", type=int, default=18)
    add_config_args(p)


def run(args: argparse.Namespace) -> int:
    if args.format == "onnx":
        return _run_onnx(args)
    if args.sam3_weights is None:
        raise Es3Error("es3 export to a PyTorch checkpoint needs --sam3_weights (the base to merge into)")
    require_torch("es3 export (it writes a PyTorch checkpoint)")
    # torch, jax and the models load when the command runs
    from es3_jax import weights
    from porting import export

    output, fmt = export.check_output(
        args.output_path, args.sam3_weights, fmt=args.format, overwrite=args.overwrite
    )  # before the work, not after it
    stage2 = weights.load(
        args.stage2_weights, args.config, overrides=args.overrides, parts=(weights.STUDENT,)
    )
    base = weights.load(args.sam3_weights, stage2.cfg, parts=("tracker",))
    result = export.export_merged(stage2, base, output, fmt=fmt, overwrite=args.overwrite)
    for line in result.summary.lines():
        print(line)
    print(f"memory path: {result.record['memory']}; its config is recorded in the file (es3_config)")
    print(f"wrote {result.path} ({result.format})")
    return 0


def _run_onnx(args: argparse.Namespace) -> int:
    if args.sam3_weights is not None:
        raise Es3Error("--format onnx exports the weights of --stage2_weights alone: drop --sam3_weights")
    # jax, the models and jax2onnx load when the command runs
    from es3_jax.deploy.onnx_export import export_onnx
    from es3_jax.predictor import VideoPredictor

    overrides = list(args.overrides)
    if args.image_size is not None:
        overrides += ["MODEL.TEACHER.IMAGE_SIZE", str(args.image_size)]
    predictor = VideoPredictor.from_checkpoint(
        args.stage2_weights,
        config=args.config,
        overrides=overrides,
        memory=args.memory,
        storage_dtype=np.float32,
    )
    result = export_onnx(
        predictor,
        args.output_path,
        objects=args.objects,
        points=args.points,
        cond_frames=args.cond_frames,
        opset=args.opset,
        source=str(args.stage2_weights),
        overwrite=args.overwrite,
    )
    for line in result.lines():
        print(line)
    print(f"wrote {result.folder}")
    return 0
