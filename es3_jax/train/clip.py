"""One training clip through the tracker: the teacher's rollout, the student beside it, and the losses.

A clip is T frames of trunk features and the ground-truth masks of O object slots. Frame 0 is the
conditioning frame: each object's ground-truth mask is the prompt (upstream `_use_mask_as_output`)
and its memory. Frames 1..T-1 are tracked with the memory bank of the previous frames, exactly as
at inference without memory selection (the cond frame plus the last `num_maskmem − 1` frames,
pointers of every earlier frame), so the bank and its selections are static and the frames run as
one `jax.lax.scan`.

Distillation: teacher and student read banks built from the same predictions (the
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
from es3_jax.memory.bank import MemoryBank, Selection
from es3_jax.memory.path import MemoryPath
from es3_jax.memory.policy import bank_policy
from es3_jax.memory.schedule import BankLayout, MemorySchedule
from es3_jax.models.tracker import SAM3Tracker
from es3_jax.nn.layers import resize_bilinear
from es3_jax.train import losses

TEACHER_FEATURES = "teacher_features"  # the checkpoint name of the teacher's memory-conditioned features


class ClipOutput(NamedTuple):
    """Per-clip results. Terms are `[T-1, O]` (tracked frames × object slots)."""

    terms: losses.MaskTerms  # of the supervised tracker (the student when distilling)
    mse: jax.Array  # [T-1, O] student-vs-teacher feature MSE (zeros when fine-tuning)
    masks: jax.Array  # [T, O, Hm, Wm] bool: the supervised tracker's masks (frame 0: the prompt)
    teacher_masks: jax.Array  # [T, O, Hm, Wm] bool: the teacher's masks (= masks when fine-tuning)
    # [T-1, O, g, g, d]: the memory-conditioned features the MSE compares (unused outputs cost nothing
    # under jit: XLA drops them).
    student_features: jax.Array
    teacher_features: jax.Array


def clip_selections(cfg: TrackerConfig, num_frames: int, num_objects: int) -> tuple[BankLayout, Selection]:
    """The bank layout of a clip and the reads of its tracked frames 1..T-1, stacked `[T-1, O, ...]`:
    the predictor's schedule (`es3_jax.memory.schedule`) with frame 0 conditioning every object,
    read by the config's bank policy without frames' scores (they are known only on the device):
    SAM3's reads recent frames, memory selection off."""
    layout = BankLayout.for_clip(cfg, num_frames)
    schedule = MemorySchedule(cfg, layout, num_frames, num_objects, policy=bank_policy(cfg, scored=False))
    for obj in range(num_objects):
        schedule.condition(obj, 0)
    tracked = np.ones(num_objects, bool)
    rows = []
    for frame in range(1, num_frames):
        reads = schedule.select(frame, False, tracked)
        schedule.record(frame, reads)
        rows.append(reads)
    return layout, Selection(**{k: jnp.asarray(np.stack([r[k] for r in rows])) for k in Selection._fields})


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
    teacher_path = teacher.memory_path()
    frames = teacher.frame_features(trunk)  # leading dim T
    compute = frames.feat.dtype

    # Frame 0: the ground-truth masks are the output and the memory. Mask prompts enter at the
    # memory encoder's mask size, 16 × the feature grid (upstream 1152).
    first = jax.tree.map(lambda x: x[:1], frames).expand(num_objects)
    gt0 = gt_at_mask_size(gt_masks[0], 16 * t_cfg.grid)[..., None].astype(jnp.float32)
    prompt = teacher.mask_as_output(first.feat, first.high_res, gt0)
    mem, mem_pos = teacher.encode_memory(
        first.feat, prompt.high_res_masks, prompt.object_score_logits, is_mask_from_pts=False
    )
    layout, selections = clip_selections(t_cfg, num_frames, num_objects)
    cond_slot = jnp.zeros((num_objects,), jnp.int32)  # the schedule's slot of frame 0

    def new_bank(path: MemoryPath) -> MemoryBank:
        tokens, tokens_pos = path.compress(mem, mem_pos)
        bank = MemoryBank.empty(
            num_objects, layout.slots, layout.pointer_slots, tokens.shape[1:], t_cfg.D_MODEL, compute
        )
        return bank.write(
            tokens, tokens_pos, prompt.obj_ptr, cond_slot, cond_slot, jnp.ones((num_objects,), bool)
        )

    banks = (new_bank(teacher_path), new_bank(student) if distill else None)
    tracked = jax.tree.map(lambda x: x[1:, None], frames)  # scanned: one batch-1 frame per step

    def step(carry, xs):
        bank_t, bank_s = carry
        frame, gt, sel = xs
        # Named so that frame-level remat keeps it: recomputing it would run the frozen teacher twice.
        cond_t = checkpoint_name(teacher.condition(teacher_path, frame, bank_t, sel), TEACHER_FEATURES)
        heads_t = teacher.tracked_heads(cond_t, frame)
        if distill:
            cond_s = teacher.condition(student, frame, bank_s, sel)
            heads_s = teacher.tracked_heads(cond_s, frame)
            mse = losses.feature_mse(cond_s, cond_t)
        else:
            cond_s, heads_s, mse = cond_t, heads_t, jnp.zeros((num_objects,), jnp.float32)
        source = heads_s if cfg.TRAIN.MEMORY_SOURCE == "student" else heads_t
        features, pos = teacher.tracked_memory(frame, source)
        write = (source.obj_ptr, sel.write_slot, sel.write_pointer_slot, sel.write)
        bank_t = bank_t.write(*teacher_path.compress(features, pos), *write)
        if distill:
            bank_s = bank_s.write(*student.compress(features, pos), *write)
        terms = losses.mask_terms(
            jnp.moveaxis(heads_s.high_res_multimasks, -1, 1),
            heads_s.ious,
            heads_s.object_score_logits[:, 0],
            gt,
            cfg.TRAIN.LOSS,
        )
        masks = (heads_s.high_res_masks[..., 0] > 0, heads_t.high_res_masks[..., 0] > 0)
        return (bank_t, bank_s), (terms, mse, masks, (cond_s, cond_t))

    if cfg.TRAIN.REMAT in ("frame", "frame_layer"):
        # A scan body needs no CSE barrier (the loop already keeps the recomputation apart), and
        # XLA's CPU backend crashes on the barrier there.
        policy = jax.checkpoint_policies.save_only_these_names(TEACHER_FEATURES)
        step = jax.checkpoint(step, policy=policy, prevent_cse=False)
    _, (terms, mse, (masks, teacher_masks), (cond_s, cond_t)) = jax.lax.scan(
        step, banks, (tracked, gt_masks[1:], selections)
    )
    first_masks = gt_masks[:1].astype(bool)
    return ClipOutput(
        terms,
        mse,
        jnp.concatenate([first_masks, masks], axis=0),
        jnp.concatenate([first_masks, teacher_masks], axis=0),
        cond_s,
        cond_t,
    )
