"""`es3 demo`: the frozen SAM3 tracker end to end, with nothing to download.

Weights: the real SAM3 tracker when `--sam3_weights` is given (ported first), otherwise the
embedded default, a SAM3-geometry tracker with random weights. They are written as an es3
weights folder and read back, then the teacher processes a two-frame clip of synthetic trunk
features: frame 0 is prompted with a mask and encoded into memory, frame 1 attends to that
memory and its object pointer and decodes masks. Every component is jit-compiled and timed.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from es3_jax import config as config_lib
from es3_jax import tracker_weights
from es3_jax.models.memory_attention import memory_key_angles
from es3_jax.models.memory_encoder import encode_new_memory
from es3_jax.models.sam_heads import forward_sam_heads, object_pointer_pos, use_mask_as_output
from es3_jax.models.tracker import SAM3Tracker, build_tracker
from es3_jax.params import param_dict


def _timed(fn: Callable, *args) -> tuple[object, float]:
    """Result and wall milliseconds of a warmed-up call (the first call compiles)."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, 1000 * (time.perf_counter() - start)


def _disk_mask(size: int, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] + 0.5
    return (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (radius * size) ** 2)[None, :, :, None]


def prepare_weights(output_dir: Path, cfg: config_lib.Config, sam3_weights: str | None, seed: int) -> Path:
    weights_dir = output_dir / "weights"
    if (output_dir / "summary.json").is_file() and weights_dir.is_dir():
        shutil.rmtree(weights_dir)  # this folder holds an earlier demo run: start it afresh
    if sam3_weights:
        from es3_jax.models.tracker import expected_param_shapes
        from porting.sam3_checkpoint import port_checkpoint

        result = port_checkpoint(sam3_weights, expected=expected_param_shapes(cfg.MODEL.TEACHER))
        return tracker_weights.save(weights_dir, result.params, cfg, result.summary())
    tracker = SAM3Tracker(cfg.MODEL.TEACHER, rngs=nnx.Rngs(seed))
    report = {"source": f"random initialisation (seed {seed})"}
    return tracker_weights.save(weights_dir, param_dict(tracker), cfg, report)


def run(output_dir: str | Path, *, sam3_weights: str | None = None, seed: int = 0) -> dict:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cfg = config_lib.Config()
    weights_dir = prepare_weights(output_dir, cfg, sam3_weights, seed)
    params, cfg = tracker_weights.load(weights_dir)
    teacher = cfg.MODEL.TEACHER
    tracker = build_tracker(teacher, params, source=str(weights_dir))
    graphdef, state = nnx.split(tracker)
    g = teacher.grid
    print(f"tracker: {sum(x.size for x in jax.tree.leaves(state)):,} parameters, {g}x{g} token grid")

    def step(fn):
        return jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))

    @step
    def backbone(t, trunk_features):
        feats, pos = t.neck(trunk_features)
        return feats[2], pos[2], t.mask_decoder.project_high_res(feats[0], feats[1])

    @step
    def prompt_frame(t, feat, high_res, mask):
        out = use_mask_as_output(
            t.prompt_encoder,
            t.mask_decoder,
            t.obj_ptr_proj,
            t.no_obj_ptr[...],
            t.mask_downsample,
            feat,
            high_res,
            mask,
            backbone_stride=teacher.BACKBONE_STRIDE,
        )
        memory, memory_pos = encode_new_memory(
            t.memory_encoder,
            t.no_obj_embed_spatial[...],
            feat,
            out.high_res_masks,
            out.object_score_logits,
            is_mask_from_pts=False,
        )
        return memory, memory_pos, out.obj_ptr

    @step
    def track_frame(t, feat, feat_pos, high_res, memory, memory_pos, obj_ptr):
        b, _, _, d = feat.shape
        mem = memory.shape[-1]
        # One conditioning frame (temporal slot index num_maskmem - 1) and its pointer, split into
        # d/mem tokens that share the pointer's temporal encoding.
        spatial_pos = memory_pos + t.maskmem_tpos_enc[teacher.NUM_MASKMEM - 1].reshape(1, 1, 1, mem)
        ptr_tokens = obj_ptr.reshape(b, d // mem, mem)
        ptr_pos = object_pointer_pos(t.obj_ptr_tpos_proj, jnp.ones((1,)), 2)
        ptr_pos = jnp.broadcast_to(ptr_pos, (b, d // mem, mem))
        conditioned = t.memory_attention(
            feat.reshape(b, g * g, d),
            feat_pos.reshape(b, g * g, d),
            jnp.concatenate([memory.reshape(b, g * g, mem), ptr_tokens], axis=1),
            jnp.concatenate([spatial_pos.reshape(b, g * g, mem), ptr_pos], axis=1),
            query_grid=(g, g),
            key_angles=memory_key_angles(g, g, 1, d // mem, t.memory_attention.head_dim),
        ).reshape(b, g, g, d)
        return forward_sam_heads(
            t.prompt_encoder,
            t.mask_decoder,
            t.obj_ptr_proj,
            t.no_obj_ptr[...],
            conditioned,
            high_res,
            multimask_output=True,
        )

    rng = np.random.default_rng(seed)
    frames = [jnp.asarray(rng.standard_normal((1, g, g, teacher.TRUNK_DIM), np.float32)) for _ in range(2)]
    mask = jnp.asarray(_disk_mask(16 * g, 0.25), jnp.float32)
    timings = {}
    (feat0, _, high_res0), timings["neck_ms"] = _timed(backbone, state, frames[0])
    (memory, memory_pos, obj_ptr), timings["mask_prompt_and_memory_encoder_ms"] = _timed(
        prompt_frame, state, feat0, high_res0, mask
    )
    (feat1, pos1, high_res1), _ = _timed(backbone, state, frames[1])
    out, timings["memory_attention_and_decoder_ms"] = _timed(
        track_frame, state, feat1, pos1, high_res1, memory, memory_pos, obj_ptr
    )
    masks = np.asarray(out.high_res_masks[0, :, :, 0]) > 0
    summary = {
        "weights": str(weights_dir),
        "weights_source": "sam3_weights" if sam3_weights else f"random init, seed {seed}",
        "token_grid": g,
        "memory_shape": list(memory.shape),
        "frame1_mask_logits_shape": list(out.high_res_masks.shape),
        "frame1_mask_area_fraction": float(masks.mean()),
        "frame1_object_score_logit": float(out.object_score_logits[0, 0]),
        "frame1_predicted_ious": [float(x) for x in np.asarray(out.ious[0])],
        **{k: round(v, 1) for k, v in timings.items()},
        "device": str(jax.devices()[0]),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
