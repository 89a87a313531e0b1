"""`es3 bench track`: frames per second of the whole tracking loop, SAM3's teacher beside the seed
student, JAX beside PyTorch, at several numbers of objects.

The loop timed is what a user runs on a folder of JPEG frames: `init_state`, one mask prompt per
object on frame 0, and `propagate_in_video` over every frame, each frame's masks `[O, H, W]` at video
resolution in host memory. It covers decoding and resizing the frames, the trunk, the neck, the
memory path (attention over the bank; for the student also compressing each new memory), the SAM
heads, the memory encoder, and resizing the masks to the video's size. A first pass over the first
`--warmup_frames` frames is not timed: it compiles every JAX function the loop calls (the bank's
shapes are fixed from the first tracked frame on, and a record's `recompiled` counts any compilation
in the timed pass); PyTorch gets the same pass.

Both frameworks run the same random weights at the config's geometry (`configs/tiny.yaml` by
default; `--config configs/efficient_memory.yaml` for SAM3's 1008 px and 32-block ViT):

- teacher: PyTorch is upstream sam3's `Sam3TrackerPredictor` with SAM3's ViT and dual neck as its
  backbone (`porting.upstream.tracker_predictor`); JAX is `VideoPredictor(memory="teacher")` on the
  sam3.pt written from its weights.
- student: the seed's memory path (`configs/efficient_memory.yaml`'s `MODEL.PERCEIVER` and
  `MODEL.MEMORY_ATTENTION` over the config's geometry; trailing overrides still apply), exported into
  that sam3.pt with `porting.export.export_merged`; PyTorch loads the merged file with
  `porting.torch_student.load_efficient_sam3`, JAX with `VideoPredictor(memory="student")`.
- stage1: the fully efficient model, a stage-1 trunk (`--stage1_trunk`, EfficientSAM3's RepViT-M1.1
  by default) under the student, JAX only (a stage-1 trunk is timm code, not sam3's, so upstream has
  no PyTorch predictor for it), random weights: the same shapes and work as a trained one.

The score head's bias is raised so that every object stays present (with random weights an object
declared absent gets constant logits and skews nothing but the masks). Frames are normalised with
ImageNet's mean and std in both frameworks, as upstream's tracker predictor loads them.

A record: frames/s and ms per frame of the loop; the trunk's ms per frame (JAX: the predictor's
"trunk" timing; PyTorch: hooks around the ViT trunk's forward) and its share; the rest; ms per frame
per object; the peak memory during the timed pass (CPU: the process's peak RSS, reset before the
pass; GPU: the device's peak, which for JAX is the process's high-water mark so far). Derived:
`speedup_vs_teacher` (a student or stage-1 record: the teacher's ms per frame over its own, same
framework and objects) and `speedup_vs_pytorch` (a JAX record: PyTorch's ms per frame over JAX's, same model
and objects).
"""

from __future__ import annotations

import argparse
import colorsys
import contextlib
import dataclasses
import io
import math
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from es3_jax import config as config_lib
from es3_jax.errors import Es3Error

HELP = "the whole tracking loop (JPEG frames to masks), frames/s: SAM3 teacher vs student, JAX vs PyTorch"

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODELS = ("teacher", "student", "stage1")
FRAMEWORKS = ("jax", "pytorch")
# What upstream's tracker predictor normalises frames with (sam3.model.utils.sam2_utils).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GIB = 2**30


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="models to time")
    p.add_argument(
        "--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS), help="frameworks to time"
    )
    p.add_argument("--objects", nargs="+", type=int, default=[1, 8, 32], help="objects tracked at once")
    p.add_argument(
        "--objects_per_batch",
        type=int,
        default=None,
        help="the JAX predictor tracks the objects in batches of at most this many (none: all in one)",
    )
    p.add_argument(
        "--stage1_trunk",
        default="repvit_m1_1",
        choices=config_lib.STAGE1_TRUNK_KINDS,
        help="the stage-1 trunk of the stage1 model",
    )
    p.add_argument("--num_frames", type=int, default=32, help="frames of the video (the bank fills after 7)")
    p.add_argument(
        "--video_size", nargs=2, type=int, default=[240, 320], metavar=("H", "W"), help="of the drawn video"
    )
    p.add_argument(
        "--frames",
        default=None,
        help="a folder of JPEG frames (00000.jpg, ...) to track instead of the drawn video; its first "
        "--num_frames frames are used, the objects prompted by ellipses on a lattice",
    )
    p.add_argument("--warmup_frames", type=int, default=2, help="frames of the untimed first pass")
    p.add_argument("--seed", type=int, default=0, help="of the random weights")
    p.add_argument(
        "--workdir", default=None, help="where the weights and frames are written (none: a temporary folder)"
    )
    p.add_argument("--config", default=str(CONFIGS / "tiny.yaml"), help="the config giving the geometry")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY VALUE", help="config overrides as KEY VALUE pairs (both models)"
    )


# --- the video and its prompts -------------------------------------------------------------------


def _lattice(objects: int, height: int, width: int) -> list[tuple[float, float, float, float]]:
    """(cy, cx, ry, rx) of `objects` ellipses, one per cell of a lattice over the frame."""
    cols = math.ceil(math.sqrt(objects * width / height))
    rows = math.ceil(objects / cols)
    ch, cw = height / rows, width / cols
    return [((k // cols + 0.5) * ch, (k % cols + 0.5) * cw, 0.3 * ch, 0.3 * cw) for k in range(objects)]


def _ellipse(height: int, width: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width] + 0.5
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0


def _drift(frame: int, k: int, ry: float, rx: float) -> tuple[float, float]:
    """Object k's offset (dy, dx) on a frame: a slow circle within its cell."""
    phase = 0.3 * frame + k
    return 0.4 * ry * math.sin(phase), 0.4 * rx * math.cos(phase)


def write_video(folder: Path, num_frames: int, height: int, width: int, objects: int) -> Path:
    """JPEG frames `00000.jpg`, ... of `objects` coloured ellipses circling on a textured background."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:height, :width]
    background = np.stack([96 + 64 * np.sin(xx / 23.0), 96 + 64 * np.cos(yy / 17.0), 128 + 0 * xx], -1)
    lattice = _lattice(objects, height, width)
    colours = [np.array(colorsys.hsv_to_rgb(k / objects, 0.8, 0.95)) * 255 for k in range(objects)]
    for t in range(num_frames):
        frame = background + rng.normal(0, 8, background.shape)
        for k, (cy, cx, ry, rx) in enumerate(lattice):
            dy, dx = _drift(t, k, ry, rx)
            frame[_ellipse(height, width, cy + dy, cx + dx, ry, rx)] = colours[k]
        Image.fromarray(np.clip(frame, 0, 255).astype(np.uint8)).save(folder / f"{t:05d}.jpg", quality=90)
    return folder


def prompt_masks(objects: int, height: int, width: int) -> list[np.ndarray]:
    """Each object's mask `[H, W]` bool on frame 0 (the drawn video's ellipses there)."""
    out = []
    for k, (cy, cx, ry, rx) in enumerate(_lattice(objects, height, width)):
        dy, dx = _drift(0, k, ry, rx)
        out.append(_ellipse(height, width, cy + dy, cx + dx, ry, rx))
    return out


def _video_folder(args: argparse.Namespace, workdir: Path) -> tuple[Path, tuple[int, int]]:
    """The folder of exactly `--num_frames` JPEG frames to track, and its (H, W)."""
    folder = workdir / "frames"
    shutil.rmtree(folder, ignore_errors=True)  # a reused --workdir may hold another run's frames
    if args.frames is None:
        h, w = args.video_size
        return write_video(folder, args.num_frames, h, w, max(args.objects)), (h, w)
    given = sorted(
        (p for p in Path(args.frames).iterdir() if p.suffix.lower() in (".jpg", ".jpeg")),
        key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.name),
    )
    if len(given) < args.num_frames:
        raise Es3Error(
            f"--frames {args.frames}: {len(given)} JPEG frames, fewer than --num_frames {args.num_frames}"
        )
    folder.mkdir(parents=True)
    for i, path in enumerate(given[: args.num_frames]):
        (folder / f"{i:05d}.jpg").symlink_to(path.resolve())
    with Image.open(given[0]) as image:
        return folder, (image.height, image.width)


# --- the models -----------------------------------------------------------------------------------


def configs(args: argparse.Namespace) -> dict[str, config_lib.Config]:
    """The teacher's, the student's and the stage-1 model's config: `--config` + overrides, the
    student's memory path from configs/efficient_memory.yaml (stage1: and `--stage1_trunk`), frames
    normalised as upstream's tracker predictor does."""
    base = config_lib.load(args.config, args.overrides)
    seed_student = config_lib.load(CONFIGS / "efficient_memory.yaml")
    student = dataclasses.replace(
        base.MODEL,
        PERCEIVER=seed_student.MODEL.PERCEIVER,
        MEMORY_ATTENTION=seed_student.MODEL.MEMORY_ATTENTION,
    )
    student = config_lib.apply_overrides(dataclasses.replace(base, MODEL=student), args.overrides)
    data = {"PIXEL_MEAN": IMAGENET_MEAN, "PIXEL_STD": IMAGENET_STD}
    return {
        name: config_lib.validate(dataclasses.replace(cfg, DATA=dataclasses.replace(cfg.DATA, **data)))
        for name, cfg in (
            ("teacher", base),
            ("student", student),
            ("stage1", config_lib.apply_overrides(student, ["MODEL.TRUNK.KIND", args.stage1_trunk])),
        )
    }


def torch_teacher(cfg: config_lib.Config, seed: int):
    """Upstream's `Sam3TrackerPredictor` with SAM3's ViT + dual neck as backbone, at the config's
    geometry, random weights from `seed`, every object scored present."""
    import torch

    from porting.torch_student import sam3_backbone
    from porting.upstream import randomize_, tracker_predictor

    t = cfg.MODEL.TEACHER
    model = tracker_predictor(
        image_size=t.IMAGE_SIZE,
        memory_selection=t.USE_MEMORY_SELECTION,
        backbone=sam3_backbone(cfg),
        num_maskmem=t.NUM_MASKMEM,
        max_cond_frames_in_attn=t.MAX_COND_FRAMES_IN_ATTN,
        max_obj_ptrs_in_encoder=t.MAX_OBJ_PTRS_IN_ENCODER,
        mf_threshold=t.MF_THRESHOLD,
    )
    randomize_(model, seed)
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def write_weights(teacher, cfgs: dict[str, config_lib.Config], seed: int, workdir: Path) -> dict[str, Path]:
    """sam3.pt of the PyTorch teacher's weights, and the merged export of a random seed student into it."""
    import torch

    from es3_jax import weights
    from porting.export import export_merged
    from porting.keymap import STUDENT_TABLE
    from porting.sam3_checkpoint import port_state_dict
    from porting.torch_student import torch_student_from_config, twin_state_dict
    from porting.upstream import randomize_

    backbone = "backbone.vision_backbone."
    sd = {
        (f"detector.{k}" if k.startswith(backbone) else f"tracker.{k}"): v.detach().cpu().clone()
        for k, v in teacher.state_dict().items()
    }
    sam3 = workdir / "sam3.pt"
    torch.save({"model": sd}, sam3)
    twin = torch_student_from_config(cfgs["student"])
    randomize_(twin, seed + 1)  # JAX's initialisers leave the student near zero
    student = port_state_dict(twin_state_dict(twin), table=STUDENT_TABLE).params
    shutil.rmtree(workdir / "student", ignore_errors=True)  # weights.save writes only a new folder
    run = weights.save(
        workdir / "student", weights.Weights(cfgs["student"], "bench", "weights_folder", student=student)
    )
    stage2 = weights.load(run, parts=(weights.STUDENT,))
    base = weights.load(sam3, stage2.cfg, parts=("tracker",))
    merged = export_merged(stage2, base, workdir / "efficient_sam3_full.pt", overwrite=True).path
    return {"teacher": sam3, "student": Path(merged)}


# --- one timed loop -------------------------------------------------------------------------------


def _rss_reset() -> None:
    """Reset the process's peak RSS (Linux); where it cannot be, the peak is the process's so far."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _rss_peak_gib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024 / GIB


@dataclasses.dataclass
class Loop:
    """One timed pass: wall seconds, the trunk's seconds, the last frame's logits `[O, H, W]`,
    compilations during the pass, and the peak memory (GiB)."""

    seconds: float
    trunk_seconds: float
    last_logits: np.ndarray
    recompiled: int
    peak_gib: float


def jax_predictor(path: Path | None, cfg, model: str, objects_per_batch: int | None, seed: int):
    """`VideoPredictor` of `model` from the written weights (stage1: random weights from `seed`)."""
    from es3_jax.predictor import VideoPredictor

    memory = "teacher" if model == "teacher" else "student"
    return VideoPredictor.from_checkpoint(
        path, config=cfg, memory=memory, seed=seed, objects_per_batch=objects_per_batch
    )


def _jax_loop(predictor, folder: Path, masks, num_frames: int, warmup: int) -> Loop:
    import jax

    def track(frames: int) -> np.ndarray:
        state = predictor.init_state(str(folder))
        for k, mask in enumerate(masks):
            predictor.add_new_mask(state, 0, k + 1, mask)
        for _, _, logits in predictor.propagate_in_video(state, 0, max_frame_num_to_track=frames - 1):
            last = logits
        return last

    track(warmup)
    traces = sum(predictor.trace_counts.values())
    predictor.timings.clear()
    cpu = jax.default_backend() == "cpu"
    _rss_reset()
    start = time.perf_counter()
    last = track(num_frames)
    seconds = time.perf_counter() - start
    peak = _rss_peak_gib() if cpu else jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0) / GIB
    recompiled = sum(predictor.trace_counts.values()) - traces
    return Loop(seconds, predictor.timings.get("trunk", 0.0) / 1e3, last, recompiled, peak)


def _torch_loop(model_obj, folder: Path, masks, num_frames: int, warmup: int) -> Loop:
    import torch

    cuda = torch.cuda.is_available()
    trunk = model_obj.backbone.vision_backbone.trunk
    clock = {"start": 0.0, "total": 0.0}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def before(module, inputs):
        sync()
        clock["start"] = time.perf_counter()

    def after(module, inputs, output):
        sync()
        clock["total"] += time.perf_counter() - clock["start"]

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def track(frames: int) -> np.ndarray:
        with torch.inference_mode(), autocast:
            with contextlib.redirect_stderr(io.StringIO()):  # upstream's frame-loading progress bar
                state = model_obj.init_state(
                    video_path=str(folder), offload_video_to_cpu=not cuda, offload_state_to_cpu=not cuda
                )
            for k, mask in enumerate(masks):
                model_obj.add_new_mask(state, 0, k + 1, torch.from_numpy(mask))
            for _, _, _, video_res, _ in model_obj.propagate_in_video(
                state,
                start_frame_idx=0,
                max_frame_num_to_track=frames - 1,
                reverse=False,
                tqdm_disable=True,
                propagate_preflight=True,
            ):
                last = video_res[:, 0].float().cpu().numpy()
        sync()
        return last

    hooks = [trunk.register_forward_pre_hook(before), trunk.register_forward_hook(after)]
    try:
        track(warmup)
        clock["total"] = 0.0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        _rss_reset()
        start = time.perf_counter()
        last = track(num_frames)
        seconds = time.perf_counter() - start
    finally:
        for hook in hooks:
            hook.remove()
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else _rss_peak_gib()
    return Loop(seconds, clock["total"], last, 0, peak)


# --- the benchmark --------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    record: dict
    last_logits: np.ndarray  # [O, H, W] of the video's last frame


def _record(model: str, framework: str, objects: int, frames: int, loop: Loop, batch) -> dict:
    ms = 1e3 * loop.seconds / frames
    trunk = 1e3 * loop.trunk_seconds / frames
    return {
        "model": model,
        "framework": framework,
        "objects": objects,
        "objects_per_batch": batch if framework == "jax" and batch is not None else "all",
        "frames": frames,
        "fps": frames / loop.seconds,
        "ms_per_frame": ms,
        "trunk_ms_per_frame": trunk,
        "trunk_share": trunk / ms,
        "rest_ms_per_frame": ms - trunk,
        "ms_per_object": ms / objects,
        "peak_gib": loop.peak_gib,
        "recompiled": loop.recompiled,
    }


def track(args: argparse.Namespace) -> list[Result]:
    """Every (model, framework, objects) case of `args`, in that order."""
    if min(args.objects) < 1 or args.num_frames < 2 or not 1 <= args.warmup_frames <= args.num_frames:
        raise Es3Error("--objects and --num_frames need at least 1 and 2; --warmup_frames 1 to --num_frames")
    cfgs = configs(args)
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="es3_track_")))
        workdir.mkdir(parents=True, exist_ok=True)
        folder, (h, w) = _video_folder(args, workdir)
        teacher = torch_teacher(cfgs["teacher"], args.seed)
        paths = write_weights(teacher, cfgs, args.seed, workdir)
        results = []
        for model in args.models:
            torch_model = jax_model = None
            frameworks = [f for f in args.frameworks if model != "stage1" or f == "jax"]
            if "jax" in frameworks:
                jax_model = jax_predictor(
                    paths.get(model), cfgs[model], model, args.objects_per_batch, args.seed
                )
            if "pytorch" in frameworks:
                if model == "teacher":
                    torch_model = teacher
                else:
                    from porting.torch_student import load_efficient_sam3

                    torch_model = load_efficient_sam3(paths["student"])
            for framework in frameworks:
                for objects in args.objects:
                    masks = prompt_masks(objects, h, w)
                    if framework == "jax":
                        loop = _jax_loop(jax_model, folder, masks, args.num_frames, args.warmup_frames)
                    else:
                        loop = _torch_loop(torch_model, folder, masks, args.num_frames, args.warmup_frames)
                    record = _record(model, framework, objects, args.num_frames, loop, args.objects_per_batch)
                    results.append(Result(record, loop.last_logits))
                    print(
                        f"track: {model} {framework} {objects} objects: {record['fps']:.3g} frames/s",
                        file=sys.stderr,
                    )
    return results


def add_speedups(records: list[dict]) -> list[dict]:
    """`speedup_vs_teacher` on student and stage-1 records, `speedup_vs_pytorch` on JAX records (from this run)."""
    ms = {(r["model"], r["framework"], r["objects"]): r["ms_per_frame"] for r in records}
    for r in records:
        teacher = ms.get(("teacher", r["framework"], r["objects"]))
        if r["model"] != "teacher" and teacher is not None:
            r["speedup_vs_teacher"] = teacher / r["ms_per_frame"]
        pytorch = ms.get((r["model"], "pytorch", r["objects"]))
        if r["framework"] == "jax" and pytorch is not None:
            r["speedup_vs_pytorch"] = pytorch / r["ms_per_frame"]
    return records


def run(args: argparse.Namespace) -> list[dict]:
    return add_speedups([result.record for result in track(args)])
