"""The SAM3 video tracker's frozen parts as one NNX module tree.

Component attribute names are the es3 parameter prefixes of the key tables in
`porting/keymap.py` (`neck`, `memory_encoder`, `memory_attention`, `prompt_encoder`,
`mask_decoder`), and the tracker-level learned tensors keep their upstream names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from es3_jax.config import TrackerConfig
from es3_jax.models.memory_attention import MemoryAttention
from es3_jax.models.memory_encoder import MemoryEncoder, encode_new_memory
from es3_jax.models.memory_path import MemoryPath
from es3_jax.models.neck import TrackerNeck
from es3_jax.models.sam_heads import (
    NO_OBJ_SCORE,
    MaskDecoder,
    PromptEncoder,
    SamHeadsOutput,
    forward_sam_heads,
    mask_downsample_conv,
    object_pointer_mlp,
    object_pointer_tpos_linear,
    use_mask_as_output,
)
from es3_jax.nn.layers import Dtype, resize_bilinear
from es3_jax.nn.position_encoding import sine_1d
from es3_jax.params import abstract_shapes, bind


class SAM3Tracker(nnx.Module):
    """Neck, memory encoder, memory attention, prompt encoder, mask decoder and the tracker's
    own parameters (object-pointer heads and learned embeddings).

    Learned embeddings keep the upstream shapes: `maskmem_tpos_enc [num_maskmem, 1, 1, mem_dim]`,
    `no_mem_embed [1, 1, d]`, `no_obj_ptr [1, d]`, `no_obj_embed_spatial [1, mem_dim]`.
    """

    def __init__(
        self, cfg: TrackerConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32, remat: bool = False
    ):
        d, mem = cfg.D_MODEL, cfg.MEM_DIM
        self.neck = TrackerNeck(cfg.TRUNK_DIM, d, rngs=rngs, dtype=dtype)
        self.memory_encoder = MemoryEncoder(d, mem, rngs=rngs, dtype=dtype)
        self.memory_attention = MemoryAttention(
            cfg.MEMORY_ATTENTION_LAYERS,
            d,
            mem,
            cfg.MEMORY_ATTENTION_FFN_DIM,
            cfg.MEMORY_ATTENTION_HEADS,
            cfg.ROPE_THETA,
            rngs=rngs,
            dtype=dtype,
            remat=remat,
        )
        self.prompt_encoder = PromptEncoder(
            d, cfg.IMAGE_SIZE, cfg.grid, cfg.MASK_IN_CHANS, rngs=rngs, dtype=dtype
        )
        self.mask_decoder = MaskDecoder(
            d,
            cfg.NUM_MULTIMASK_OUTPUTS,
            cfg.DECODER_DEPTH,
            cfg.DECODER_HEADS,
            cfg.DECODER_MLP_DIM,
            rngs=rngs,
            stability_delta=cfg.DYNAMIC_MULTIMASK_STABILITY_DELTA,
            stability_thresh=cfg.DYNAMIC_MULTIMASK_STABILITY_THRESH,
            dtype=dtype,
        )
        self.mask_downsample = mask_downsample_conv(rngs=rngs, dtype=dtype)
        self.obj_ptr_proj = object_pointer_mlp(d, rngs=rngs, dtype=dtype)
        self.obj_ptr_tpos_proj = object_pointer_tpos_linear(d, mem, rngs=rngs, dtype=dtype)
        normal = nnx.initializers.normal(0.02)
        self.maskmem_tpos_enc = nnx.Param(normal(rngs.params(), (cfg.NUM_MASKMEM, 1, 1, mem), jnp.float32))
        self.no_mem_embed = nnx.Param(normal(rngs.params(), (1, 1, d), jnp.float32))
        self.no_obj_ptr = nnx.Param(normal(rngs.params(), (1, d), jnp.float32))
        self.no_obj_embed_spatial = nnx.Param(normal(rngs.params(), (1, mem), jnp.float32))


def expected_param_shapes(cfg: TrackerConfig) -> dict[str, tuple[int, ...]]:
    """`{es3 path: shape}` of every tracker parameter, computed without allocating any."""
    return abstract_shapes(lambda: SAM3Tracker(cfg, rngs=nnx.Rngs(0)))


def build_tracker(
    cfg: TrackerConfig, params: Mapping, *, dtype: Dtype = jnp.float32, source: str = ""
) -> SAM3Tracker:
    """A `SAM3Tracker` holding `params` (nested dict, e.g. from `tracker_weights.load`), strictly."""
    return bind(lambda: SAM3Tracker(cfg, rngs=nnx.Rngs(0), dtype=dtype), params, source)


# ---------------------------------------------------------------------------------------------
# One tracking step over a fixed-size memory bank (DESIGN.md D8).
#
# The bank is a store of K memory frames and Kp object pointers per object; which stored entries
# a step reads, in which temporal slot, is decided on the host (`es3_jax.predictor`) and passed in
# as small index tables (`Selection`). Every array has a shape fixed by the configuration and the
# number of objects, so the step compiles once, whatever the video length.
# ---------------------------------------------------------------------------------------------


class FrameFeatures(NamedTuple):
    """One frame's tracker features (batch 1; the step broadcasts them to the objects)."""

    feat: jax.Array  # [1, g, g, d] raw level-2 feature
    pos: jax.Array  # [1, g, g, d] its sine encoding
    high_res: tuple[jax.Array, jax.Array]  # projected skips [1, 4g, 4g, d/8], [1, 2g, 2g, d/4]


class MemoryBank(NamedTuple):
    """The stored memories of one inference state.

    tokens: `[O, K, N, Cm]` in the storage dtype (bfloat16, as upstream stores memories);
    tokens_pos: `[N, Cm]` float32 (frame independent); pointers: `[O, Kp, C]` float32.
    """

    tokens: jax.Array
    tokens_pos: jax.Array
    pointers: jax.Array


class Selection(NamedTuple):
    """Which bank entries one step reads and where it writes (built on the host).

    S spatial slots and P pointer slots per object; `frame_tpos` indexes `maskmem_tpos_enc`;
    `pointer_rel` is the pointer's signed temporal distance (divided by `pointer_scale` in the
    step). `write` marks the objects tracked by this step: only they get their new memory
    written, at `write_slot` / `write_pointer_slot`.
    """

    frame_slot: jax.Array  # [O, S] int32
    frame_tpos: jax.Array  # [O, S] int32
    frame_valid: jax.Array  # [O, S] bool
    pointer_slot: jax.Array  # [O, P] int32
    pointer_rel: jax.Array  # [O, P] float32
    pointer_valid: jax.Array  # [O, P] bool
    pointer_scale: jax.Array  # [] float32: min(num_frames, max pointers) - 1
    write_slot: jax.Array  # [O] int32
    write_pointer_slot: jax.Array  # [O] int32
    write: jax.Array  # [O] bool


class StepOutput(NamedTuple):
    """Per-object results of a step (O objects)."""

    low_res_masks: jax.Array  # [O, 4g, 4g] float32 logits (NO_OBJ_SCORE where absent)
    obj_ptr: jax.Array  # [O, C]
    object_score_logits: jax.Array  # [O]
    iou_score: jax.Array  # [O] best predicted IoU
    presence: jax.Array  # [O] 2·sigmoid(score) − 1 where the score is positive, else 0


def empty_bank(
    num_objects: int,
    num_slots: int,
    num_pointer_slots: int,
    tokens_shape: tuple[int, int],
    dim: int,
    storage_dtype: Dtype = jnp.bfloat16,
) -> MemoryBank:
    """A zeroed bank: `tokens_shape = (N, Cm)` per memory frame, `dim` the pointer width."""
    n, c = tokens_shape
    return MemoryBank(
        jnp.zeros((num_objects, num_slots, n, c), storage_dtype),
        jnp.zeros((n, c), jnp.float32),
        jnp.zeros((num_objects, num_pointer_slots, dim), jnp.float32),
    )


def frame_features(tracker: SAM3Tracker, trunk_features: jax.Array) -> FrameFeatures:
    """Trunk features `[1, g, g, Ct]` -> the tracker's features of that frame."""
    feats, pos = tracker.neck(trunk_features)
    return FrameFeatures(feats[2], pos[2], tracker.mask_decoder.project_high_res(feats[0], feats[1]))


def expand_frame(frame: FrameFeatures, b: int) -> FrameFeatures:
    """A batch-1 frame broadcast to `b` objects."""

    def grow(x):
        return jnp.broadcast_to(x, (b, *x.shape[1:]))

    return FrameFeatures(
        grow(frame.feat), grow(frame.pos), (grow(frame.high_res[0]), grow(frame.high_res[1]))
    )


def _pointer_tokens(pointers: jax.Array, mem_dim: int) -> jax.Array:
    """Pointers `[B, P, C]` -> `[B, P·C/Cm, Cm]`: pointer p becomes tokens p·r .. p·r + r − 1 (its channel chunks)."""
    b, p, c = pointers.shape
    return pointers.reshape(b, p * (c // mem_dim), mem_dim)


def memory_conditioned(
    tracker: SAM3Tracker, memory: MemoryPath, frame: FrameFeatures, bank: MemoryBank, sel: Selection
) -> jax.Array:
    """The frame's level-2 feature conditioned on the selected memories -> `[O, g, g, d]`."""
    o = sel.frame_slot.shape[0]
    frame = expand_frame(frame, o)
    _, gh, gw, d = frame.feat.shape
    mem_dim = bank.tokens.shape[-1]
    compute = frame.feat.dtype
    frames = jnp.take_along_axis(bank.tokens, sel.frame_slot[:, :, None, None], axis=1).astype(compute)
    tpos = tracker.maskmem_tpos_enc[...][sel.frame_tpos].reshape(o, -1, 1, mem_dim)
    frames_pos = (bank.tokens_pos[None, None] + tpos).astype(compute)
    pointers = jnp.take_along_axis(bank.pointers, sel.pointer_slot[:, :, None], axis=1)
    per_pointer = pointers.shape[-1] // mem_dim
    pointer_pos = tracker.obj_ptr_tpos_proj(
        sine_1d(sel.pointer_rel / sel.pointer_scale, tracker.obj_ptr_tpos_proj.in_features)
    )
    out = memory(
        frame.feat.reshape(o, gh * gw, d),
        frame.pos.reshape(o, gh * gw, d),
        query_grid=(gh, gw),
        frames=frames,
        frames_pos=frames_pos,
        frame_valid=sel.frame_valid,
        pointers=_pointer_tokens(pointers, mem_dim).astype(compute),
        pointers_pos=jnp.repeat(pointer_pos, per_pointer, axis=1).astype(compute),
        pointer_valid=jnp.repeat(sel.pointer_valid, per_pointer, axis=1),
    )
    return out.reshape(o, gh, gw, d)


def tracked_heads(tracker: SAM3Tracker, conditioned: jax.Array, frame: FrameFeatures) -> SamHeadsOutput:
    """SAM heads of a tracked frame: memory-conditioned features `[O, g, g, d]` and the frame's
    high-res skips (broadcast to O), 3-mask output with argmax-IoU selection."""
    return forward_sam_heads(
        tracker.prompt_encoder,
        tracker.mask_decoder,
        tracker.obj_ptr_proj,
        tracker.no_obj_ptr[...],
        conditioned,
        frame.high_res,
        multimask_output=True,
    )


def tracked_memory(
    tracker: SAM3Tracker, frame: FrameFeatures, heads: SamHeadsOutput
) -> tuple[jax.Array, jax.Array]:
    """The memory a tracked frame leaves (raw features and pos `[O, g, g, Cm]`), from its predicted
    high-res mask (sigmoid, `20·m − 10`) and object score."""
    return encode_new_memory(
        tracker.memory_encoder,
        tracker.no_obj_embed_spatial[...],
        frame.feat,
        heads.high_res_masks,
        heads.object_score_logits,
        is_mask_from_pts=False,
    )


def track_step(
    tracker: SAM3Tracker, memory: MemoryPath, frame: FrameFeatures, bank: MemoryBank, sel: Selection
) -> tuple[StepOutput, MemoryBank]:
    """Track every object one frame (upstream `track_step` on a propagated frame, at eval).

    Memory attention over the selected memories, SAM heads with the 3-mask output and argmax-IoU
    selection, then the new memory from the predicted high-res mask (sigmoid, `20·m − 10`), which
    is compressed by the memory path and written for the objects marked in `sel.write`.
    """
    o = sel.frame_slot.shape[0]
    conditioned = memory_conditioned(tracker, memory, frame, bank, sel)
    expanded = expand_frame(frame, o)
    heads = tracked_heads(tracker, conditioned, expanded)
    features, pos = tracked_memory(tracker, expanded, heads)
    tokens, tokens_pos = memory.compress(features, pos)
    bank = write_memory(
        bank, tokens, tokens_pos, heads.obj_ptr, sel.write_slot, sel.write_pointer_slot, sel.write
    )
    scores = heads.object_score_logits[:, 0]
    iou = jnp.max(heads.ious, axis=-1)
    presence = jnp.where(scores > 0, 2.0 * jax.nn.sigmoid(scores) - 1.0, 0.0)
    out = StepOutput(heads.low_res_masks[..., 0], heads.obj_ptr, scores, iou, presence)
    return out, bank


def write_memory(
    bank: MemoryBank,
    tokens: jax.Array,
    tokens_pos: jax.Array,
    obj_ptr: jax.Array,
    slot: jax.Array,
    pointer_slot: jax.Array,
    write: jax.Array,
) -> MemoryBank:
    """Store each object's new memory tokens `[O, N, Cm]` and pointer `[O, C]` where `write` `[O]` holds."""
    idx = jnp.arange(tokens.shape[0])
    old = bank.tokens[idx, slot]
    new = jnp.where(write[:, None, None], tokens.astype(bank.tokens.dtype), old)
    old_ptr = bank.pointers[idx, pointer_slot]
    new_ptr = jnp.where(write[:, None], obj_ptr.astype(bank.pointers.dtype), old_ptr)
    return MemoryBank(
        bank.tokens.at[idx, slot].set(new),
        tokens_pos[0].astype(jnp.float32),
        bank.pointers.at[idx, pointer_slot].set(new_ptr),
    )


class PromptOutput(NamedTuple):
    """A prompted frame's output for one object (batch 1)."""

    low_res_masks: jax.Array  # [1, 4g, 4g] logits
    obj_ptr: jax.Array  # [1, C]
    object_score_logits: jax.Array  # [1]
    iou_score: jax.Array  # [1]


def mask_prompt(tracker: SAM3Tracker, frame: FrameFeatures, mask: jax.Array) -> PromptOutput:
    """A mask prompt (upstream `_use_mask_as_output`): mask `[1, 16g, 16g, 1]` in [0, 1].

    The low-res mask is left to the caller (upstream replaces it by the video-resolution mask).
    """
    g = frame.feat.shape[1]
    out = use_mask_as_output(
        tracker.prompt_encoder,
        tracker.mask_decoder,
        tracker.obj_ptr_proj,
        tracker.no_obj_ptr[...],
        tracker.mask_downsample,
        frame.feat,
        frame.high_res,
        mask,
        backbone_stride=mask.shape[1] // (4 * g),
    )
    return PromptOutput(
        jnp.zeros((1, 4 * g, 4 * g), jnp.float32), out.obj_ptr, out.object_score_logits[:, 0], out.ious[:, 0]
    )


def click_prompt(
    tracker: SAM3Tracker,
    frame: FrameFeatures,
    coords: jax.Array,
    labels: jax.Array,
    prev_logits: jax.Array | None,
    *,
    multimask_output: bool,
) -> PromptOutput:
    """Clicks and/or a box on a frame, decoded without memory (upstream `add_new_points_or_box`).

    coords `[1, P, 2]` in input-image pixels, labels `[1, P]` (box corners first, labels 2/3);
    prev_logits `[1, 4g, 4g]`: the object's previous low-res logits on this frame (fed as a mask
    prompt, clamped to ±32) or None.
    """
    feat = frame.feat + tracker.no_mem_embed[...].reshape(1, 1, 1, -1).astype(frame.feat.dtype)
    mask_prompt_ = None if prev_logits is None else jnp.clip(prev_logits, -32.0, 32.0)[..., None]
    heads = forward_sam_heads(
        tracker.prompt_encoder,
        tracker.mask_decoder,
        tracker.obj_ptr_proj,
        tracker.no_obj_ptr[...],
        feat,
        frame.high_res,
        points=(coords, labels),
        mask_prompt=mask_prompt_,
        multimask_output=multimask_output,
    )
    return PromptOutput(
        heads.low_res_masks[..., 0], heads.obj_ptr, heads.object_score_logits[:, 0], jnp.max(heads.ious, -1)
    )


def prompt_memory(
    tracker: SAM3Tracker,
    memory: MemoryPath,
    frame: FrameFeatures,
    low_res_masks: jax.Array,
    object_score_logits: jax.Array,
    prompted: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Memories of a prompted frame (upstream `propagate_in_video_preflight`, run_mem_encoder=True).

    low_res_masks `[O, 4g, 4g]` (the consolidated prompt outputs), object_score_logits `[O]`,
    prompted `[O]` bool. The masks are up-sampled to the image size, only the top-scoring
    prompted object keeps each pixel, and they are binarised before encoding. Returns the
    compressed (tokens, tokens_pos), each `[O, N, Cm]`.
    """
    o = low_res_masks.shape[0]
    s = tracker.prompt_encoder.image_size
    masks = jnp.where(prompted[:, None, None], low_res_masks, NO_OBJ_SCORE)[..., None]
    masks = resize_bilinear(masks.astype(jnp.float32), s, s)
    top = jnp.argmax(masks, axis=0, keepdims=True) == jnp.arange(o)[:, None, None, None]
    masks = jnp.where(top, masks, jnp.minimum(masks, -10.0))
    features, pos = encode_new_memory(
        tracker.memory_encoder,
        tracker.no_obj_embed_spatial[...],
        jnp.broadcast_to(frame.feat, (o, *frame.feat.shape[1:])),
        masks,
        object_score_logits[:, None],
        is_mask_from_pts=True,
    )
    return memory.compress(features, pos)
