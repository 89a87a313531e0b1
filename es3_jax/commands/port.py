"""`es3 port`: SAM3 tracker weights from a PyTorch checkpoint into an es3 weights folder."""

from __future__ import annotations

import argparse

from es3_jax.commands.common import add_config_args, load_config

HELP = "port SAM3 tracker weights from PyTorch into an es3 weights folder"
DESCRIPTION = """\
Read the SAM3 tracker and its neck from a PyTorch checkpoint and write them as an es3
weights folder (orbax params + config.yaml + port.json) that loads without torch.

Accepted: Meta's sam3.pt (ckpt['model'] with tracker.* and detector.* keys); a stage-1
merged checkpoint (same layout, another trunk: reported as foreign, not ported); a
transformers Sam3TrackerVideoModel .safetensors file or folder. Porting is strict:
missing, unexpected and mis-shaped tracker keys are listed together and nothing is
written. Detector keys es3 does not use are reported, not an error."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sam3_weights", required=True, help="sam3.pt, a stage-1 merged .pt, or a .safetensors")
    p.add_argument("--output_dir", required=True, help="weights folder to create (must not exist or be empty)")
    add_config_args(p)


def run(args: argparse.Namespace) -> int:
    from es3_jax import tracker_weights
    from es3_jax.models.tracker import expected_param_shapes
    from porting.sam3_checkpoint import format_report, port_checkpoint

    cfg = load_config(args)
    result = port_checkpoint(args.sam3_weights, expected=expected_param_shapes(cfg.MODEL.TEACHER))
    out = tracker_weights.save(args.output_dir, result.params, cfg, result.summary())
    print(format_report(result))
    print(f"wrote {out}")
    return 0
