"""The config tree: the seed's defaults, YAML files, KEY VALUE overrides, errors, dump."""

from pathlib import Path

import pytest

from es3_jax import config as config_lib
from es3_jax.config import Config, ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The seed README's table of key configuration options and its training settings.
SEED_DEFAULTS = {
    "DATA.SAV_ROOT": "data/sa-v/extracted_frames",
    "DATA.USE_PRECOMPUTED": True,
    "DATA.NUM_FRAMES": 8,
    "DATA.FRAME_SKIP": 4,
    "MODEL.PERCEIVER.NUM_LATENTS": 256,
    "MODEL.PERCEIVER.NUM_LATENTS_2D": 256,
    "MODEL.PERCEIVER.DEPTH": 2,
    "MODEL.MEMORY_ATTENTION.NUM_LAYERS": 2,
    "MODEL.MEMORY_ATTENTION.POOL_SIZE": 2,
    "TRAIN.LR": 3e-4,
    "TRAIN.MAX_STEPS": 130000,
    "TRAIN.WARMUP_STEPS": 15000,
    "TRAIN.BATCH_SIZE": 4,
    "TRAIN.EFFECTIVE_BATCH_SIZE": 256,
    "TRAIN.WEIGHT_DECAY": 0.1,
    "TRAIN.CLIP_GRAD": 0.1,
    "TRAIN.LOSS.FOCAL": 20.0,
    "TRAIN.LOSS.DICE": 1.0,
    "TRAIN.LOSS.IOU": 1.0,
    "TRAIN.LOSS.MSE": 1.0,
}


def get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("source", ["defaults", "efficient_memory.yaml"])
def test_seed_defaults(source):
    cfg = Config() if source == "defaults" else config_lib.load(CONFIGS / source)
    for key, value in SEED_DEFAULTS.items():
        assert get(cfg, key) == value, key


def test_teacher_config_describes_the_sam3_tracker():
    teacher = config_lib.load(CONFIGS / "teacher_sam3.yaml").MODEL.TEACHER
    assert teacher.grid == 72
    assert (teacher.NUM_MASKMEM, teacher.MEMORY_ATTENTION_LAYERS, teacher.MEM_DIM) == (7, 4, 64)
    assert teacher.MAX_OBJ_PTRS_IN_ENCODER == 16 and teacher.MAX_COND_FRAMES_IN_ATTN == 4


def test_overrides_parse_each_type():
    cfg = config_lib.load(
        CONFIGS / "efficient_memory.yaml",
        [
            "DATA.USE_PRECOMPUTED",
            "False",
            "TRAIN.LR",
            "1e-3",
            "TRAIN.MAX_STEPS",
            "20",
            "DATA.EMBEDDING_DIR",
            "/x/y",
            "MODEL.MEMORY_ATTENTION.INIT_FROM_TEACHER_LAYERS",
            "[0, 3]",
        ],
    )
    assert cfg.DATA.USE_PRECOMPUTED is False
    assert cfg.TRAIN.LR == 1e-3 and isinstance(cfg.TRAIN.LR, float)
    assert cfg.TRAIN.MAX_STEPS == 20
    assert cfg.DATA.EMBEDDING_DIR == "/x/y"
    assert cfg.MODEL.MEMORY_ATTENTION.INIT_FROM_TEACHER_LAYERS == (0, 3)
    assert cfg.TRAIN.WARMUP_STEPS == 15000  # untouched keys keep the file's values


@pytest.mark.parametrize(
    ("pairs", "names"),
    [
        (["TRAIN.LRR", "1"], "TRAIN.LRR"),
        (["MODELL.X", "1"], "MODELL"),
        (["TRAIN.LR", "fast"], "TRAIN.LR"),
        (["TRAIN.MAX_STEPS", "1.5"], "TRAIN.MAX_STEPS"),
        (["DATA.USE_PRECOMPUTED", "maybe"], "DATA.USE_PRECOMPUTED"),
        (["MODEL.MEMORY_ATTENTION.INIT_FROM_TEACHER_LAYERS", "[a]"], "INIT_FROM_TEACHER_LAYERS"),
        (["TRAIN", "3"], "TRAIN"),
        (["TRAIN.MODE", "distil"], "TRAIN.MODE"),
        (["TRAIN.MEMORY_SOURCE", "gt"], "TRAIN.MEMORY_SOURCE"),
        (["TRAIN.MAX_STEPS"], "TRAIN.MAX_STEPS"),
        (["TRAIN.MAX_STEPS", "-5"], r"TRAIN.MAX_STEPS: must be at least 1, got -5"),
        (["DATA.SOURCES", "[sav, sav]", "DATA.SOURCE_WEIGHTS", "[1, 1]"], "DATA.SOURCES"),
        (["DATA.SOURCES", "[sav, sa1b]", "DATA.SOURCE_WEIGHTS", "[1]"], "DATA.SOURCE_WEIGHTS"),
        (["DATA.SOURCES", "[sav, sa1b]", "DATA.SOURCE_WEIGHTS", "[1, 0]"], "DATA.SOURCE_WEIGHTS"),
        (["DATA.AUG.CROP_SCALE", "[0.5, 1.5]"], "DATA.AUG.CROP_SCALE"),
        (["DATA.AUG.SCALE", "[1.2, 0.8]"], "DATA.AUG.SCALE"),
        (["DATA.SA1B.SCALE", "[0.9]"], "DATA.SA1B.SCALE"),
        (["DATA.AUG.HFLIP_PROB", "2"], "DATA.AUG.HFLIP_PROB"),
    ],
)
def test_bad_overrides_name_the_key(pairs, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        config_lib.load(None, pairs)


def test_bad_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("TRAIN:\n  LR: 1.0\n  NOPE: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*TRAIN\.NOPE"):
        config_lib.load(path)
    with pytest.raises(ConfigError, match="not found"):
        config_lib.load(tmp_path / "missing.yaml")


def test_dump_round_trips(tmp_path):
    cfg = config_lib.load(CONFIGS / "efficient_memory.yaml", ["TRAIN.LR", "0.01", "MESH.FSDP", "2"])
    config_lib.save(cfg, tmp_path / "config.yaml")
    assert config_lib.load(tmp_path / "config.yaml") == cfg
    hash(cfg)  # usable as a static jit argument
