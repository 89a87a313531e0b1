"""The typed configuration tree: the seed's keys (DATA.*, MODEL.*, TRAIN.*) plus MESH.*, EVAL.*, LOG.*.

A config is built from the defaults below, then a YAML file, then `KEY VALUE` overrides from
the command line (`DATA.USE_PRECOMPUTED True`). Unknown keys and values of the wrong type are
errors that name the key. Configs are frozen dataclasses (hashable, so they can be static
arguments of `jax.jit`); sequences are tuples.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from es3_jax.errors import Es3Error

# The trunks MODEL.TRUNK.KIND names: SAM3's ViT and the stage-1 students.
SAM3_VIT = "sam3_vit"
STAGE1_TRUNK_KINDS = (
    "repvit_m0_9",
    "repvit_m1_1",
    "repvit_m2_3",
    "tiny_vit_5m",
    "tiny_vit_11m",
    "tiny_vit_21m",
    "efficientvit_b0",
    "efficientvit_b1",
    "efficientvit_b2",
)
# What a checkpoint holds where it holds none of those: no trunk, or one es3 does not know.
NO_TRUNK = "none"
UNKNOWN_TRUNK = "unknown"


class ConfigError(Es3Error):
    """A config key or value the tree does not accept; the message names the dotted key."""


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training-clip augmentation on frames (DATA.USE_PRECOMPUTED False), SAM 2's video transforms with
    its MOSE fine-tuning values (es3_jax/data/augment.py); one draw per clip unless marked per frame."""

    ENABLED: bool = False
    HFLIP_PROB: float = 0.5
    # Affine about the frame centre: rotation and x-shear uniform in +-DEGREES / +-SHEAR, scale in
    # SCALE, translation up to TRANSLATE x the frame size; skipped when it pushes an object off frame 0.
    DEGREES: float = 25.0
    SHEAR: float = 20.0
    SCALE: tuple[float, ...] = (1.0, 1.0)
    TRANSLATE: float = 0.0
    # Random resized crop: the crop's share of the frame area and its aspect range; (1, 1) is SAM 2's
    # plain resize to the square.
    CROP_SCALE: tuple[float, ...] = (1.0, 1.0)
    CROP_RATIO: tuple[float, ...] = (0.75, 1.3333333333333333)
    BRIGHTNESS: float = 0.1
    CONTRAST: float = 0.03
    SATURATION: float = 0.03
    GRAYSCALE_PROB: float = 0.05
    FRAME_BRIGHTNESS: float = 0.1  # per frame, after the clip's jitter
    FRAME_CONTRAST: float = 0.05
    FRAME_SATURATION: float = 0.05


@dataclasses.dataclass(frozen=True)
class Sa1bConfig:
    """SA-1B images as training pseudo-videos (es3_jax/data/sa1b.py, es3_jax/data/pseudo_video.py)."""

    ROOT: str = ""  # sa_<id>.jpg + sa_<id>.json, in this folder or its direct subfolders
    # Masks kept (SAM 2's loader keeps any area > 0): area as a fraction of the image, quality scores.
    MIN_AREA: float = 0.0
    MAX_AREA: float = 1.0
    MIN_PREDICTED_IOU: float = 0.0
    MIN_STABILITY_SCORE: float = 0.0
    # The smooth motion from the image (frame 0) to the clip's last frame: rotation up to +-DEGREES,
    # x-shear up to +-SHEAR, scale in SCALE, translation up to TRANSLATE x the image size.
    DEGREES: float = 10.0
    SHEAR: float = 5.0
    SCALE: tuple[float, ...] = (0.85, 1.15)
    TRANSLATE: float = 0.1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    SAV_ROOT: str = "data/sa-v/extracted_frames"
    USE_PRECOMPUTED: bool = True
    EMBEDDING_DIR: str = ""
    NUM_FRAMES: int = 8
    FRAME_SKIP: int = 4  # in 24-fps frames: 4 = consecutive annotated SA-V frames
    MAX_OBJECTS: int = 3
    NUM_WORKERS: int = 8
    # Training clips (es3_jax/data/clips.py, loading.py). Annotations: `<video>_manual.json` files in
    # ANNOTATION_DIR or its direct subfolders ("" = SAV_ROOT); "manual" | "auto" | "both".
    ANNOTATION_DIR: str = ""
    ANNOTATION: str = "manual"
    DAVIS_ROOT: str = ""  # also train on this DAVIS 2017 root's "train" split ("" = off)
    REVERSE_PROB: float = 0.0
    # Held-out videos, chosen by a hash of the name: VAL_VIDEOS of them, or VAL_SPLIT of all when 0.
    VAL_SPLIT: float = 0.05
    VAL_VIDEOS: int = 0
    MASK_SIZE: int = 0  # side of the ground-truth masks; 0 = MODEL.TEACHER.IMAGE_SIZE
    PREFETCH: int = 2  # batches buffered per worker
    PIXEL_MEAN: tuple[float, ...] = (0.5, 0.5, 0.5)
    PIXEL_STD: tuple[float, ...] = (0.5, 0.5, 0.5)
    # The embedding store (`es3 embed`): dtype of the stored trunk features ("bfloat16", "float32", or
    # "int8" with per-frame, per-channel scales: half bf16's bytes, read back as bf16),
    # frames per shard file (one frame per chunk inside it) and the blosc-zstd level.
    EMBEDDING_DTYPE: str = "bfloat16"
    EMBEDDING_SHARD_FRAMES: int = 16
    EMBEDDING_CLEVEL: int = 3
    # A video the readers cannot use (unreadable annotations, a frame missing, masks of another size)
    # is left out of training and named in train.log and metrics.jsonl; True makes any such video an
    # error instead.
    STRICT: bool = False
    # Training sources mixed by weight (each source's share of an epoch's clips): any format of
    # es3_jax/data/datasets.py, e.g. "sav" (DATA.SAV_ROOT), "davis" (DATA.DAVIS_ROOT's train split),
    # "sa1b" (DATA.SA1B.ROOT). Empty: the videos of SAV_ROOT and DAVIS_ROOT as one pool. Validation
    # holds out videos of the first source.
    SOURCES: tuple[str, ...] = ()
    SOURCE_WEIGHTS: tuple[float, ...] = ()
    SA1B: Sa1bConfig = Sa1bConfig()
    AUG: AugmentConfig = AugmentConfig()


@dataclasses.dataclass(frozen=True)
class TrackerConfig:
    """Geometry and settings of the SAM3 video tracker (the frozen teacher)."""

    IMAGE_SIZE: int = 1008
    BACKBONE_STRIDE: int = 14
    TRUNK_DIM: int = 1024
    D_MODEL: int = 256
    MEM_DIM: int = 64
    NUM_MASKMEM: int = 7
    MAX_COND_FRAMES_IN_ATTN: int = 4
    MAX_OBJ_PTRS_IN_ENCODER: int = 16
    MEMORY_ATTENTION_LAYERS: int = 4
    MEMORY_ATTENTION_FFN_DIM: int = 2048
    MEMORY_ATTENTION_HEADS: int = 1
    ROPE_THETA: float = 10000.0
    DECODER_DEPTH: int = 2
    DECODER_HEADS: int = 8
    DECODER_MLP_DIM: int = 2048
    NUM_MULTIMASK_OUTPUTS: int = 3
    MASK_IN_CHANS: int = 16
    DYNAMIC_MULTIMASK_STABILITY_DELTA: float = 0.05
    DYNAMIC_MULTIMASK_STABILITY_THRESH: float = 0.98
    USE_MEMORY_SELECTION: bool = True
    MF_THRESHOLD: float = 0.01
    # Which tracked frames a step reads besides its conditioning frames (`es3_jax.memory.policy`):
    # "sam3" is upstream's, with memory selection as USE_MEMORY_SELECTION says.
    MEMORY_POLICY: str = "sam3"

    @property
    def grid(self) -> int:
        """Tokens per side of the trunk's feature map (72 for 1008 px at stride 14)."""
        return self.IMAGE_SIZE // self.BACKBONE_STRIDE


@dataclasses.dataclass(frozen=True)
class TrunkConfig:
    """The trunk that turns frames into the tracker's `[S/14, S/14, 1024]` features; its input size is
    `MODEL.TEACHER.IMAGE_SIZE`. KIND `sam3_vit` is SAM3's ViT (`sam3/model_builder.py:69-96`, the
    fields below); the others are EfficientSAM3's stage-1 students with their head, set from the
    checkpoint that holds one."""

    KIND: str = SAM3_VIT
    PATCH_SIZE: int = 14
    WIDTH: int = 1024
    DEPTH: int = 32
    NUM_HEADS: int = 16
    MLP_DIM: int = 4736
    WINDOW_SIZE: int = 24
    GLOBAL_BLOCKS: tuple[int, ...] = (7, 15, 23, 31)  # the output is that of the last one
    PRETRAIN_IMAGE_SIZE: int = 336  # the abs pos-embed table is (336/14)² = 24×24, tiled to the grid


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
    """The student's Perceiver Resampler; off = raw memory frames."""

    ENABLED: bool = True
    NUM_LATENTS: int = 256
    NUM_LATENTS_2D: int = 256  # a square: the g×g grid of window latents
    DEPTH: int = 2
    HEADS: int = 1
    FF_MULT: int = 4
    WINDOW_SIZE: int = 4  # memory pixels per 2-D latent window side (the memory is resized to g·WINDOW_SIZE)


@dataclasses.dataclass(frozen=True)
class MemoryAttentionConfig:
    """The student's memory attention: the teacher's layer design, fewer layers, p×p pooling."""

    NUM_LAYERS: int = 2
    POOL_SIZE: int = 2
    INIT_FROM_TEACHER_LAYERS: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # The frozen teacher (distill) or the tracker to fine-tune: a sam3.pt, an es3 weights folder
    # (`es3 port`, or `<output_dir>/weights` of a training run); "" = random weights from TRAIN.SEED.
    TEACHER_WEIGHTS: str = ""
    TEACHER: TrackerConfig = TrackerConfig()
    TRUNK: TrunkConfig = TrunkConfig()
    PERCEIVER: PerceiverConfig = PerceiverConfig()
    MEMORY_ATTENTION: MemoryAttentionConfig = MemoryAttentionConfig()
    COMPUTE_DTYPE: str = "auto"  # auto = bfloat16 on accelerators, float32 on CPU


@dataclasses.dataclass(frozen=True)
class LossConfig:
    FOCAL: float = 20.0
    DICE: float = 1.0
    IOU: float = 1.0
    MSE: float = 1.0
    OBJ_SCORE: float = 0.0
    FOCAL_ALPHA: float = 0.25
    FOCAL_GAMMA: float = 2.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    MODE: str = "distill"  # distill | finetune
    # Tracker parts TRAIN.MODE finetune trains (others stay frozen); any of neck, memory_encoder,
    # memory_attention, prompt_encoder, mask_decoder, obj_ptr_proj, obj_ptr_tpos_proj, ...
    FINETUNE_MODULES: tuple[str, ...] = ("memory_attention", "memory_encoder", "mask_decoder")
    LR: float = 3e-4
    MAX_STEPS: int = 130000
    WARMUP_STEPS: int = 15000
    BATCH_SIZE: int = 4  # per device
    EFFECTIVE_BATCH_SIZE: int = 256
    WEIGHT_DECAY: float = 0.1
    CLIP_GRAD: float = 0.1
    MEMORY_SOURCE: str = "teacher"  # distillation: whose predictions build the memory bank
    EVAL_EVERY: int = 5000
    SAVE_EVERY: int = 10000
    KEEP_LATEST: int = 3
    MAX_BAD_STEPS: int = 10
    SEED: int = 0
    # Gradient checkpointing (jax.checkpoint): "none"; "frame" recomputes each tracked frame of a
    # clip in the backward pass (the teacher's memory-conditioned features are kept, so the frozen
    # teacher is not run twice); "layer" recomputes inside each memory-attention and perceiver layer;
    # "frame_layer" does both. docs/benchmarks.md has what each saves and costs.
    REMAT: str = "none"
    # The seed's mixed-precision switch: an alias of MODEL.COMPUTE_DTYPE bfloat16 (bf16 compute,
    # float32 parameters, optimiser state and gradients; LayerNorm, softmax and losses in float32).
    AMP: bool = False
    LOSS: LossConfig = LossConfig()


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    DATA: int = -1  # -1: every device not used by the other axes
    FSDP: int = 1
    # Parameter partition rules, first match wins: "<regex on the dotted param path>=<spec>", the spec
    # one mesh axis name or "_" (replicated) per array dimension, e.g. "linear1.kernel=_,fsdp".
    PARAM_RULES: tuple[str, ...] = ()
    # Without a matching rule, a parameter at least this large is sharded over fsdp along its largest
    # divisible dimension; smaller ones are replicated.
    FSDP_MIN_SIZE_MB: float = 4.0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    DATASET: str = "davis"
    DATA_ROOT: str = ""


@dataclasses.dataclass(frozen=True)
class LogConfig:
    EVERY: int = 50
    TENSORBOARD: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    DATA: DataConfig = DataConfig()
    MODEL: ModelConfig = ModelConfig()
    TRAIN: TrainConfig = TrainConfig()
    MESH: MeshConfig = MeshConfig()
    EVAL: EvalConfig = EvalConfig()
    LOG: LogConfig = LogConfig()


C = TypeVar("C")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`, accepting the string forms a command line gives; ConfigError otherwise."""
    origin = typing.get_origin(tp)
    if origin in (tuple, Sequence, list):
        (elem, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list of {_type_name(elem)}, got {value!r}")
        return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in the config tree")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected a bool (True/False), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def merge(node: C, data: Mapping[str, Any], prefix: str = "") -> C:
    """A copy of the config `node` with the values of the nested mapping `data` applied."""
    if not isinstance(data, Mapping):
        section = prefix.rstrip(".") or "config"
        raise ConfigError(f"{section}: is a section; expected a mapping of its keys, got {data!r}")
    hints = typing.get_type_hints(type(node))
    changes = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(f"{prefix}{k}" for k in hints)
            raise ConfigError(f"unknown config key {dotted} (known here: {known})")
        tp = hints[key]
        current = getattr(node, key)
        if dataclasses.is_dataclass(tp):
            changes[key] = merge(current, value if value is not None else {}, f"{dotted}.")
        else:
            changes[key] = _coerce(value, tp, dotted)
    return dataclasses.replace(node, **changes)


def override(cfg: C, key: str, value: str) -> C:
    """Set one dotted key from its command-line string form."""
    parts = key.split(".")
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    return merge(cfg, nested)


def apply_overrides(cfg: C, pairs: Sequence[str]) -> C:
    """Apply `KEY VALUE KEY VALUE ...` as given on a command line."""
    if len(pairs) % 2:
        raise ConfigError(f"overrides come in KEY VALUE pairs; {pairs[-1]!r} has no value")
    for key, value in zip(pairs[0::2], pairs[1::2], strict=True):
        cfg = override(cfg, key, value)
    return cfg


def load(path: str | Path | None = None, overrides: Sequence[str] = (), base: Config | None = None) -> Config:
    """Defaults (or `base`), then the YAML file at `path`, then `KEY VALUE` overrides."""
    cfg = base if base is not None else Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        try:
            cfg = merge(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
    return validate(apply_overrides(cfg, overrides))


CHOICES = {
    "MODEL.TRUNK.KIND": (SAM3_VIT, *STAGE1_TRUNK_KINDS),
    "TRAIN.MODE": ("distill", "finetune"),
    "TRAIN.MEMORY_SOURCE": ("teacher", "student"),
    "TRAIN.REMAT": ("none", "frame", "layer", "frame_layer"),
}


def validate(cfg: Config) -> Config:
    """Refuse values that are each well typed but do not fit together, or that name no known choice;
    the message names the keys."""
    for key, allowed in CHOICES.items():
        value = cfg
        for name in key.split("."):
            value = getattr(value, name)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
    if cfg.TRAIN.AMP:
        if cfg.MODEL.COMPUTE_DTYPE not in ("auto", "bfloat16"):
            raise ConfigError(
                f"TRAIN.AMP True computes in bfloat16, but MODEL.COMPUTE_DTYPE is {cfg.MODEL.COMPUTE_DTYPE!r}; "
                "set one of the two"
            )
        cfg = dataclasses.replace(cfg, MODEL=dataclasses.replace(cfg.MODEL, COMPUTE_DTYPE="bfloat16"))
    trunk, teacher = cfg.MODEL.TRUNK, cfg.MODEL.TEACHER
    if trunk.WIDTH != teacher.TRUNK_DIM:
        raise ConfigError(
            f"MODEL.TRUNK.WIDTH ({trunk.WIDTH}) must equal MODEL.TEACHER.TRUNK_DIM ({teacher.TRUNK_DIM})"
        )
    if trunk.PATCH_SIZE != teacher.BACKBONE_STRIDE:
        raise ConfigError(
            f"MODEL.TRUNK.PATCH_SIZE ({trunk.PATCH_SIZE}) must equal MODEL.TEACHER.BACKBONE_STRIDE "
            f"({teacher.BACKBONE_STRIDE})"
        )
    if not trunk.GLOBAL_BLOCKS or not all(0 <= i < trunk.DEPTH for i in trunk.GLOBAL_BLOCKS):
        raise ConfigError(
            f"MODEL.TRUNK.GLOBAL_BLOCKS {list(trunk.GLOBAL_BLOCKS)} must be a non-empty list of block "
            f"indices below MODEL.TRUNK.DEPTH ({trunk.DEPTH})"
        )
    for key in ("TRAIN.MAX_STEPS", "TRAIN.BATCH_SIZE", "DATA.NUM_FRAMES", "DATA.MAX_OBJECTS"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise ConfigError(f"{key}: must be at least 1, got {getattr(getattr(cfg, section), name)}")
    _validate_data(cfg.DATA)
    if trunk.WIDTH % trunk.NUM_HEADS or (trunk.WIDTH // trunk.NUM_HEADS) % 4:
        raise ConfigError(
            f"MODEL.TRUNK.NUM_HEADS ({trunk.NUM_HEADS}) must divide MODEL.TRUNK.WIDTH ({trunk.WIDTH}) "
            "into heads whose width is a multiple of 4 (2-D RoPE)"
        )
    return cfg


def _validate_data(data: DataConfig) -> None:
    if data.SOURCES or data.SOURCE_WEIGHTS:
        # Which names are formats is the data package's registry to say, when it indexes them.
        if len(set(data.SOURCES)) != len(data.SOURCES):
            raise ConfigError(f"DATA.SOURCES {list(data.SOURCES)}: each format at most once")
        if len(data.SOURCE_WEIGHTS) != len(data.SOURCES) or not all(w > 0 for w in data.SOURCE_WEIGHTS):
            raise ConfigError(
                f"DATA.SOURCE_WEIGHTS {list(data.SOURCE_WEIGHTS)}: one positive weight per source of "
                f"DATA.SOURCES {list(data.SOURCES)}"
            )
    ranges = {
        "DATA.AUG.SCALE": (data.AUG.SCALE, 0.0, math.inf),
        "DATA.AUG.CROP_SCALE": (data.AUG.CROP_SCALE, 0.0, 1.0),
        "DATA.AUG.CROP_RATIO": (data.AUG.CROP_RATIO, 0.0, math.inf),
        "DATA.SA1B.SCALE": (data.SA1B.SCALE, 0.0, math.inf),
    }
    for key, (pair, lo, hi) in ranges.items():
        if len(pair) != 2 or not lo < pair[0] <= pair[1] <= hi:
            raise ConfigError(f"{key} {list(pair)}: expected [low, high] with {lo} < low <= high <= {hi}")
    for key, p in (("DATA.AUG.HFLIP_PROB", data.AUG.HFLIP_PROB), ("DATA.AUG.GRAYSCALE_PROB", data.AUG.GRAYSCALE_PROB)):
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"{key}: a probability in [0, 1], got {p}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def dump(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(dump(cfg))
