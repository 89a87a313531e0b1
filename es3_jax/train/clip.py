"""One training clip through the tracker: the teacher's rollout, the student beside it, and the losses.

A clip is T frames of trunk features and the ground-truth masks of O object slots. Frame 0 is the
conditioning frame: each object's ground-truth mask is the prompt (upstream `_use_mask_as_output`)
and its memory. Frames 1..T-1 are tracked with the memory bank of the previous frames, exactly as
at inference without memory selection (the cond frame plus the last `num_maskmem − 1` frames,
pointers of every earlier frame), so the bank and its selections are static and the frames run as
one `jax.lax.scan`.

Distillation (DESIGN.md D7): teacher and student read banks built from the same predictions (the
teacher's by default, `TRAIN.MEMORY_SOURCE`); the teacher's bank holds raw memories, the student's
the ones its `compress` made. The student's memory-conditioned features go through the frozen SAM
heads; its masks are supervised by the ground truth and its features by the teacher's (MSE).
Fine-tuning runs the tracker alone against the ground truth.

`TRAIN.REMAT` frame checkpoints the scan body: the backward pass keeps one tracked frame's
activations at a time and recomputes them, except the teacher's memory-conditioned features, which
are kept by name (the frozen teacher is the costliest part of a distillation frame and needs no
gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from es3_jax.config import Config, TrackerConfig
from es3_jax.models.memory_encoder import encode_new_memory
from es3_jax.models.memory_path import MemoryPath, RawMemory
from es3_jax.models.sam_heads import use_mask_as_output
from es3_jax.models.tracker import (
    MemoryBank,
    SAM3Tracker,
    Selection,
    expand_frame,
    frame_features,
    memory_conditioned,
    tracked_heads,
    tracked_memory,
    write_memory,
)
from es3_jax.nn.layers import resize_bilinear
from es3_jax.train import losses

TEACHER_FEATURES = "teacher_features"  # the checkpoint name of the teacher's memory-conditioned features


class ClipOutput(NamedTuple):
    """Per-clip results. Terms are `[T-1, O]` (tracked frames × object slots)."""

    terms: losses.MaskTerms  # of the supervised tracker (the student when distilling)
    mse: jax.Array  # [T-1, O] student-vs-teacher feature MSE (zeros when fine-tuning)
    masks: jax.Array  # [T, O, Hm, Wm] bool: the supervised tracker's masks (frame 0: the prompt)
    teacher_masks: jax.Array  # [T, O, Hm, Wm] bool: the teacher's masks (= masks when fine-tuning)


def clip_selections(cfg: TrackerConfig, num_frames: int, num_objects: int) -> Selection:
    """The bank reads of tracked frames 1..T-1, stacked `[T-1, O, ...]`; bank slot i holds frame i."""
    max_ptrs = min(num_frames, cfg.MAX_OBJ_PTRS_IN_ENCODER)
    s_slots = min(cfg.NUM_MASKMEM, num_frames)
    rows = []
    for t in range(1, num_frames):
        spatial = [(0, cfg.NUM_MASKMEM - 1)]
        spatial += [(t - d, d - 1) for d in range(1, cfg.NUM_MASKMEM) if t - d >= 1]
        pointers = [(0, t)] + [(t - d, d) for d in range(1, max_ptrs) if t - d >= 1]
        frame = np.zeros((3, s_slots), np.int64)
        for k, (slot, tpos) in enumerate(spatial):
            frame[:, k] = (slot, tpos, 1)
        ptr = np.zeros((3, num_frames), np.float64)
        for k, (slot, rel) in enumerate(pointers):
            ptr[:, k] = (slot, rel, 1)
        rows.append((frame, ptr, t))

    def stack(fn, dtype):
        return jnp.asarray(
            np.stack([np.broadcast_to(fn(r), (num_objects, *np.shape(fn(r)))) for r in rows]), dtype
        )

    return Selection(
        frame_slot=stack(lambda r: r[0][0], jnp.int32),
        frame_tpos=stack(lambda r: r[0][1], jnp.int32),
        frame_valid=stack(lambda r: r[0][2].astype(bool), bool),
        pointer_slot=stack(lambda r: r[1][0], jnp.int32),
        pointer_rel=stack(lambda r: r[1][1], jnp.float32),
        pointer_valid=stack(lambda r: r[1][2].astype(bool), bool),
        pointer_scale=jnp.full((num_frames - 1,), max(max_ptrs - 1, 1), jnp.float32),
        write_slot=stack(lambda r: r[2], jnp.int32),
        write_pointer_slot=stack(lambda r: r[2], jnp.int32),
        write=jnp.ones((num_frames - 1, num_objects), bool),
    )


def gt_at_mask_size(masks: jax.Array, size: int) -> jax.Array:
    """Ground truth `[..., H, W]` bool -> `[..., size, size]` bool (bilinear, antialiased, ≥ 0.5, as
    upstream resizes mask prompts)."""
    if masks.shape[-1] == size and masks.shape[-2] == size:
        return masks.astype(bool)
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, *masks.shape[-2:], 1).astype(jnp.float32)
    resized = resize_bilinear(flat, size, size, antialias=True)
    return (resized[..., 0] >= 0.5).reshape(*lead, size, size)


def run_clip(
    teacher: SAM3Tracker,
    student: MemoryPath | None,
    trunk: jax.Array,
    gt_masks: jax.Array,
    cfg: Config,
) -> ClipOutput:
    """One clip: trunk `[T, g, g, Ct]`, gt_masks `[T, O, S, S]` bool at the input image size S (where
    the SAM heads' high-res masks are, and where SAM2 computes its mask losses).

    `student=None` fine-tunes: the teacher is the supervised tracker. Otherwise the student is
    supervised; the caller differentiates only the student's parameters.
    """
    t_cfg = cfg.MODEL.TEACHER
    num_frames, num_objects = gt_masks.shape[0], gt_masks.shape[1]
    distill = student is not None
    teacher_path = RawMemory(teacher.memory_attention)
    frames = frame_features(teacher, trunk)  # leading dim T
    compute = frames.feat.dtype

    # Frame 0: the ground-truth masks are the output and the memory.
    f0 = expand_frame(jax.tree.map(lambda x: x[:1], frames), num_objects)
    # Mask prompts enter at the memory encoder's mask size, 16 × the feature grid (upstream 1152).
    gt0 = gt_at_mask_size(gt_masks[0], 16 * t_cfg.grid)[..., None].astype(jnp.float32)
    prompt = use_mask_as_output(
        teacher.prompt_encoder,
        teacher.mask_decoder,
        teacher.obj_ptr_proj,
        teacher.no_obj_ptr[...],
        teacher.mask_downsample,
        f0.feat,
        f0.high_res,
        gt0,
    )
    mem, mem_pos = encode_new_memory(
        teacher.memory_encoder,
        teacher.no_obj_embed_spatial[...],
        f0.feat,
        prompt.high_res_masks,
        prompt.object_score_logits,
        is_mask_from_pts=False,
    )

    def new_bank(path: MemoryPath) -> MemoryBank:
        tokens, tokens_pos = path.compress(mem, mem_pos)
        bank = jnp.zeros((num_objects, num_frames, *tokens.shape[1:]), compute)
        pointers = jnp.zeros((num_objects, num_frames, prompt.obj_ptr.shape[-1]), jnp.float32)
        return MemoryBank(
            bank.at[:, 0].set(tokens.astype(compute)),
            tokens_pos[0].astype(jnp.float32),
            pointers.at[:, 0].set(prompt.obj_ptr.astype(jnp.float32)),
        )

    banks = (new_bank(teacher_path), new_bank(student) if distill else None)
    selections = clip_selections(t_cfg, num_frames, num_objects)
    tracked = jax.tree.map(lambda x: x[1:, None], frames)  # scanned: one batch-1 frame per step

    def step(carry, xs):
        bank_t, bank_s = carry
        frame, gt, sel = xs
        expanded = expand_frame(frame, num_objects)
        # Named so that frame-level remat keeps it: recomputing it would run the frozen teacher twice.
        cond_t = checkpoint_name(
            memory_conditioned(teacher, teacher_path, frame, bank_t, sel), TEACHER_FEATURES
        )
        heads_t = tracked_heads(teacher, cond_t, expanded)
        if distill:
            cond_s = memory_conditioned(teacher, student, frame, bank_s, sel)
            heads_s = tracked_heads(teacher, cond_s, expanded)
            mse = ((cond_s.astype(jnp.float32) - cond_t.astype(jnp.float32)) ** 2).mean(axis=(1, 2, 3))
        else:
            heads_s, mse = heads_t, jnp.zeros((num_objects,), jnp.float32)
        source = heads_s if cfg.TRAIN.MEMORY_SOURCE == "student" else heads_t
        features, pos = tracked_memory(teacher, expanded, source)
        raw, raw_pos = teacher_path.compress(features, pos)
        bank_t = write_memory(
            bank_t, raw, raw_pos, source.obj_ptr, sel.write_slot, sel.write_pointer_slot, sel.write
        )
        if distill:
            tokens, tokens_pos = student.compress(features, pos)
            bank_s = write_memory(
                bank_s, tokens, tokens_pos, source.obj_ptr, sel.write_slot, sel.write_pointer_slot, sel.write
            )
        terms = losses.mask_terms(
            jnp.moveaxis(heads_s.high_res_multimasks, -1, 1),
            heads_s.ious,
            heads_s.object_score_logits[:, 0],
            gt,
            cfg.TRAIN.LOSS,
        )
        masks = (heads_s.high_res_masks[..., 0] > 0, heads_t.high_res_masks[..., 0] > 0)
        return (bank_t, bank_s), (terms, mse, masks)

    if cfg.TRAIN.REMAT in ("frame", "frame_layer"):
        # A scan body needs no CSE barrier (the loop already keeps the recomputation apart), and
        # XLA's CPU backend crashes on the barrier there.
        policy = jax.checkpoint_policies.save_only_these_names(TEACHER_FEATURES)
        step = jax.checkpoint(step, policy=policy, prevent_cse=False)
    _, (terms, mse, (masks, teacher_masks)) = jax.lax.scan(step, banks, (tracked, gt_masks[1:], selections))
    first = gt_masks[:1].astype(bool)
    return ClipOutput(
        terms,
        mse,
        jnp.concatenate([first, masks], axis=0),
        jnp.concatenate([first, teacher_masks], axis=0),
    )
