"""`es3 bench onnx`: the ONNX export against es3 JAX: every frame's masks, graph sizes, frames/s.

Per memory path (teacher, student): the predictor at the config's geometry with random weights
(the score head's bias raised so that every object stays present, as `es3 bench track` does) and
a float32 bank, exported with `export_onnx`, then one drawn video (`es3 bench track`'s coloured
ellipses) tracked as a stream twice: by `VideoPredictor` (`init_stream` / `add_frame` /
`track_frame`) and by `OnnxTracker` on onnxruntime's CPU provider, the same mask prompt per
object on frame 0. Each frame's logits `[O, H, W]` are compared: the relative error (max |Δ| over
max |JAX|, per frame, the worst frame reported) and each object's mask IoU (logit > 0; the worst
object and frame reported). frames/s are of a second, timed pass of each (a first one over `--warmup_frames`
compiles JAX and warms onnxruntime), image encoder and mask resizing included.

`--trunk stage1` puts a stage-1 trunk (`--stage1_trunk`) under the tracker: at 1008 px SAM3's
32-block ViT costs ~1 min a frame in each runtime on a 2-core CPU, the stage-1 trunk under a
second, and the tracker (memory attention, heads, memory encoder, bank) is the same.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.track import CONFIGS, configs, prompt_masks, write_video
from es3_jax import config as config_lib

HELP = "ONNX export vs es3 JAX: per-frame mask error and IoU, graph sizes, onnxruntime vs JAX frames/s (CPU)"
MODELS = ("teacher", "student")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="memory paths")
    p.add_argument("--objects", type=int, default=3, help="objects tracked together (the export's --objects)")
    p.add_argument("--num_frames", type=int, default=24, help="frames of the video (the bank fills after 7)")
    p.add_argument("--warmup_frames", type=int, default=3, help="frames of the untimed first pass of each")
    p.add_argument(
        "--video_size", nargs=2, type=int, default=[240, 320], metavar=("H", "W"), help="of the drawn video"
    )
    p.add_argument(
        "--trunk", choices=("config", "stage1"), default="config", help="the config's or a stage-1 trunk"
    )
    p.add_argument(
        "--stage1_trunk",
        default="repvit_m1_1",
        choices=config_lib.STAGE1_TRUNK_KINDS,
        help="with --trunk stage1",
    )
    p.add_argument("--seed", type=int, default=0, help="of the random weights")
    p.add_argument(
        "--workdir", default=None, help="where the graphs and frames go (none: a temporary folder)"
    )
    p.add_argument("--config", default=str(CONFIGS / "tiny.yaml"), help="the config giving the geometry")
    p.add_argument("overrides", nargs="*", metavar="KEY VALUE", help="config overrides as KEY VALUE pairs")


def _present(predictor):
    """The predictor with the object-score head's bias raised by 10: every object stays present."""
    from es3_jax.predictor import VideoPredictor

    tracker, memory, _ = predictor.modules()
    bias = tracker.mask_decoder.pred_obj_score_head.layers[-1].bias
    bias.set_value(bias[...] + 10.0)
    student = memory if predictor.memory == "student" else None
    return VideoPredictor(
        predictor.cfg, tracker, student=student, seed=predictor.seed, storage_dtype=predictor.storage_dtype
    )


def _track(
    tracker, folder: Path, masks: list[np.ndarray], frames: int | None = None
) -> tuple[list[np.ndarray], float]:
    """Every frame's logits of one pass as a stream (the first `frames`), and its seconds."""
    from es3_jax.deploy.onnx_tracker import read_frames

    start = time.perf_counter()
    state = tracker.init_stream()
    out = []
    for i, image in enumerate(read_frames(folder)):
        if i == frames:
            break
        tracker.add_frame(state, image)
        if i == 0:
            for k, mask in enumerate(masks):
                tracker.add_new_mask(state, 0, k + 1, mask)
        out.append(tracker.track_frame(state)[2])
    return out, time.perf_counter() - start


def compare(reference: list[np.ndarray], other: list[np.ndarray]) -> dict[str, float]:
    """Worst per-frame relative error of the logits and worst per-object mask IoU."""
    rel, iou = 0.0, 1.0
    for a, b in zip(reference, other, strict=True):
        rel = max(rel, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)))
        for x, y in zip(a > 0, b > 0, strict=True):
            union = (x | y).sum()
            iou = min(iou, float((x & y).sum() / union) if union else 1.0)
    return {"max_rel_error": rel, "min_iou": iou}


def run(args: argparse.Namespace) -> list[dict]:
    # jax, jax2onnx and onnxruntime load when the benchmark runs
    from es3_jax.deploy.onnx_export import export_onnx
    from es3_jax.deploy.onnx_tracker import OnnxTracker
    from es3_jax.predictor import VideoPredictor

    cfgs = configs(args)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        h, w = args.video_size
        folder = write_video(workdir / "frames", args.num_frames, h, w, args.objects)
        masks = prompt_masks(args.objects, h, w)
        records = []
        for model in args.models:
            cfg = cfgs[model]
            if args.trunk == "stage1":
                cfg = config_lib.apply_overrides(cfg, ["MODEL.TRUNK.KIND", args.stage1_trunk])
            predictor = _present(
                VideoPredictor.from_checkpoint(
                    None, config=cfg, memory=model, seed=args.seed, storage_dtype=np.float32
                )
            )
            start = time.perf_counter()
            result = export_onnx(predictor, workdir / f"onnx_{model}", objects=args.objects, overwrite=True)
            export_s = time.perf_counter() - start
            onnx_tracker = OnnxTracker(result.folder)
            _track(predictor, folder, masks, args.warmup_frames)  # compiles
            jax_logits, jax_s = _track(predictor, folder, masks)
            _track(onnx_tracker, folder, masks, args.warmup_frames)
            ort_logits, ort_s = _track(onnx_tracker, folder, masks)
            t = cfg.MODEL.TEACHER
            record = {
                "model": model,
                "trunk": cfg.MODEL.TRUNK.KIND,
                "image_size": t.IMAGE_SIZE,
                "objects": args.objects,
                "frames": args.num_frames,
                **compare(jax_logits, ort_logits),
                "jax_fps": args.num_frames / jax_s,
                "ort_fps": args.num_frames / ort_s,
                "export_s": export_s,
                "total_mb": sum(g.bytes for g in result.graphs) / 1e6,
            }
            record.update({f"{g.name}_mb": g.bytes / 1e6 for g in result.graphs})
            records.append(record)
        return records
