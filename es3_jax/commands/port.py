"""`es3 port`: SAM3 tracker weights from a PyTorch checkpoint into an es3 weights folder."""

from __future__ import annotations

import argparse

from es3_jax.commands.common import add_config_args, load_config

HELP = "port SAM3 tracker weights from PyTorch into an es3 weights folder"
DESCRIPTION = """\
Read the SAM3 tracker, its neck and its trunk from a PyTorch checkpoint and write them as
an es3 weights folder (orbax params + config.yaml + port.json) that loads without torch.

Accepted: Meta's sam3.pt (ckpt['model'] with tracker.* and detector.* keys); an EfficientSAM3
stage-1 merged checkpoint (same layout with a RepViT, TinyViT or EfficientViT trunk and its head:
the config's MODEL.TRUNK.KIND is set from it); a
transformers Sam3TrackerVideoModel .safetensors file or folder; a merged export (`es3 export`,
or `save_efficient_sam3` after training or editing the student in PyTorch): its student comes
back as the folder's "student" with the config its record describes (`es3 track`/`es3 eval`
then run the student). Porting is strict: missing, unexpected and mis-shaped keys are listed
together and nothing is written. Detector keys es3 does not use are reported, not an error."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sam3_weights", required=True, help="sam3.pt, a stage-1 or es3-merged .pt, or a .safetensors"
    )
    p.add_argument(
        "--output_dir", required=True, help="weights folder to create (must not exist or be empty)"
    )
    add_config_args(p)


def run(args: argparse.Namespace) -> int:
    from es3_jax import weights  # jax and the models load when the command runs

    cfg = load_config(args)
    weights.check_output(args.output_dir)  # before the work, not after it
    ported = weights.load(args.sam3_weights, cfg)
    out = weights.save(args.output_dir, ported)
    print(ported.report.get("text", f"source: {ported.source} ({ported.kind})"))
    print(f"wrote {out}")
    return 0
