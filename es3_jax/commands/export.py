"""`es3 export`: merge the trained modules into a SAM3 (or stage-1) PyTorch checkpoint."""

from __future__ import annotations

import argparse

from es3_jax.commands.common import add_config_args
from es3_jax.errors import require_torch

HELP = "merge the trained student into a SAM3 / stage-1 PyTorch checkpoint (efficient_sam3_full.pt)"
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
      --sam3_weights sam3_checkpoints/sam3.pt --output_path output/efficient_sam3_full.pt"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage2_weights", required=True, help="run folder, checkpoint or es3 weights folder")
    p.add_argument("--sam3_weights", required=True, help="base: sam3.pt or a stage-1 merged checkpoint")
    p.add_argument("--output_path", required=True, help="merged checkpoint to write (.pt or .safetensors)")
    p.add_argument(
        "--format", default="auto", choices=("auto", "pt", "safetensors"), help="auto: from the suffix"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_path")
    add_config_args(p)


def run(args: argparse.Namespace) -> int:
    require_torch("es3 export (it writes a PyTorch checkpoint)")
    from porting.export import export_merged  # torch, jax and the models load when the command runs

    result = export_merged(
        args.stage2_weights,
        args.sam3_weights,
        args.output_path,
        fmt=args.format,
        overwrite=args.overwrite,
        config=args.config,
        overrides=args.overrides,
    )
    for line in result.summary.lines():
        print(line)
    print(f"memory path: {result.record['memory']}; its config is recorded in the file (es3_config)")
    print(f"wrote {result.path} ({result.format})")
    return 0
