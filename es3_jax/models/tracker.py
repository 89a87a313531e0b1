"""The SAM3 video tracker as one NNX module: its components and everything a tracking step does.

Component attribute names are the es3 parameter prefixes of the key tables in
`porting/keymap.py` (`neck`, `memory_encoder`, `memory_attention`, `prompt_encoder`,
`mask_decoder`), and the tracker-level learned tensors keep their upstream names.

Upstream: `Sam3TrackerBase` (`sam3/model/sam3_tracker_base.py`) at inference. The methods are the
pieces of its tracking step: the SAM heads (`_forward_sam_heads`), a mask used as the output
(`_use_mask_as_output`), the memory encoding (`_encode_new_memory`), the memory-conditioned
features over the fixed-size bank (`_prepare_memory_conditioned_features`), and the step itself.
The predictor and the training clip call the same methods.

Everything is channels-last: features `[B, H, W, C]`, mask logits `[B, H, W, M]` (M masks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from es3_jax.config import TrackerConfig
from es3_jax.logits import NO_OBJ_SCORE
from es3_jax.memory.attention import MemoryAttention
from es3_jax.memory.bank import MemoryBank, Selection
from es3_jax.memory.encoder import MemoryEncoder, keep_top_object
from es3_jax.memory.path import MemoryPath
from es3_jax.models.neck import TrackerNeck
from es3_jax.models.sam_heads import MaskDecoder, PromptEncoder
from es3_jax.nn.layers import MLP, Dtype, conv, linear, resize_bilinear
from es3_jax.nn.position_encoding import sine_1d
from es3_jax.params import abstract_shapes, bind

# `_use_mask_as_output` turns a {0, 1} mask into logits ±10 (sigmoid(−10) ≈ 4.5e-5); the memory
# encoder maps masks to the same range (upstream `sigmoid_scale/bias_for_mem_enc`).
_MASK_SCALE = 20.0
_MASK_BIAS = -10.0
# A click prompt's previous logits enter the prompt encoder clamped to this magnitude.
_PREV_LOGITS_CLAMP = 32.0


class FrameFeatures(NamedTuple):
    """One frame's tracker features (batch 1, or one row per object after `expand`)."""

    feat: jax.Array  # [B, g, g, d] raw level-2 feature
    pos: jax.Array  # [B, g, g, d] its sine encoding
    high_res: tuple[jax.Array, jax.Array]  # projected skips [B, 4g, 4g, d/8], [B, 2g, 2g, d/4]

    def expand(self, b: int) -> FrameFeatures:
        """A batch-1 frame broadcast to `b` objects."""

        def grow(x: jax.Array) -> jax.Array:
            return jnp.broadcast_to(x, (b, *x.shape[1:]))

        return FrameFeatures(
            grow(self.feat), grow(self.pos), (grow(self.high_res[0]), grow(self.high_res[1]))
        )


class SamHeadsOutput(NamedTuple):
    """`_forward_sam_heads` outputs; M = 3 (multimask) or 1. Mask logits are float32."""

    low_res_multimasks: jax.Array  # [B, 4H, 4W, M]
    high_res_multimasks: jax.Array  # [B, S, S, M], S = image size
    ious: jax.Array  # [B, M]
    low_res_masks: jax.Array  # [B, 4H, 4W, 1] the selected mask
    high_res_masks: jax.Array  # [B, S, S, 1]
    obj_ptr: jax.Array  # [B, C]
    object_score_logits: jax.Array  # [B, 1]


class StepOutput(NamedTuple):
    """Per-object results of a tracking step (O objects)."""

    low_res_masks: jax.Array  # [O, 4g, 4g] float32 logits (NO_OBJ_SCORE where absent)
    obj_ptr: jax.Array  # [O, C]
    object_score_logits: jax.Array  # [O]
    iou_score: jax.Array  # [O] best predicted IoU
    presence: jax.Array  # [O] 2·sigmoid(score) − 1 where the score is positive, else 0


class PromptOutput(NamedTuple):
    """A prompted frame's output for one object (batch 1)."""

    low_res_masks: jax.Array  # [1, 4g, 4g] logits
    obj_ptr: jax.Array  # [1, C]
    object_score_logits: jax.Array  # [1]
    iou_score: jax.Array  # [1]


class SAM3Tracker(nnx.Module):
    """Neck, memory encoder, memory attention, prompt encoder, mask decoder and the tracker's
    own parameters: `mask_downsample` (a 4×4 stride-4 1→1 conv from the input-mask size to the
    mask-prompt size), `obj_ptr_proj` (SAM output token -> object pointer, a ReLU MLP
    d→d→d→d), `obj_ptr_tpos_proj` (a pointer's d-wide temporal sine code -> mem_dim) and the
    learned embeddings, in upstream's shapes: `maskmem_tpos_enc [num_maskmem, 1, 1, mem_dim]`,
    `no_mem_embed [1, 1, d]`, `no_obj_ptr [1, d]`, `no_obj_embed_spatial [1, mem_dim]`.
    """

    def __init__(
        self,
        cfg: TrackerConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        remat: bool = False,
        teacher_memory: bool = True,
    ):
        """teacher_memory: hold SAM3's memory attention (`memory_path()`); without it, the steps
        read a memory path given to them (a student's) and the tracker holds none."""
        d, mem = cfg.D_MODEL, cfg.MEM_DIM
        self.backbone_stride = cfg.BACKBONE_STRIDE
        self.neck = TrackerNeck(cfg.TRUNK_DIM, d, rngs=rngs, dtype=dtype)
        self.memory_encoder = MemoryEncoder(d, mem, rngs=rngs, dtype=dtype)
        self.memory_attention = (
            MemoryAttention(
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
            if teacher_memory
            else None
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
        self.mask_downsample = conv(1, 1, 4, stride=4, rngs=rngs, dtype=dtype)
        self.obj_ptr_proj = MLP([d, d, d, d], rngs=rngs, dtype=dtype)
        self.obj_ptr_tpos_proj = linear(d, mem, rngs=rngs, dtype=dtype)
        normal = nnx.initializers.normal(0.02)
        self.maskmem_tpos_enc = nnx.Param(normal(rngs.params(), (cfg.NUM_MASKMEM, 1, 1, mem), jnp.float32))
        self.no_mem_embed = nnx.Param(normal(rngs.params(), (1, 1, d), jnp.float32))
        self.no_obj_ptr = nnx.Param(normal(rngs.params(), (1, d), jnp.float32))
        self.no_obj_embed_spatial = nnx.Param(normal(rngs.params(), (1, mem), jnp.float32))

    # ------------------------------------------------------------------------------------------
    # the parts of a step

    def frame_features(self, trunk_features: jax.Array) -> FrameFeatures:
        """Trunk features `[B, g, g, Ct]` -> the tracker's features of those frames."""
        feats, pos = self.neck(trunk_features)
        return FrameFeatures(feats[2], pos[2], self.mask_decoder.project_high_res(feats[0], feats[1]))

    def memory_path(self) -> MemoryPath:
        """The teacher's memory path: raw memory frames, this tracker's memory attention."""
        if self.memory_attention is None:
            raise ValueError("this tracker holds no memory attention: its steps read a student's memory path")
        return MemoryPath(self.memory_attention)

    def sam_heads(
        self,
        features: jax.Array,
        high_res: tuple[jax.Array, jax.Array],
        *,
        points: tuple[jax.Array, jax.Array] | None = None,
        mask_prompt: jax.Array | None = None,
        multimask_output: bool,
    ) -> SamHeadsOutput:
        """Upstream `_forward_sam_heads`: prompt encoder and mask decoder on a frame's features.

        features `[B, H, W, C]` (memory-conditioned); high_res: projected skip features (see
        `MaskDecoder.project_high_res`); points: (coords `[B, P, 2]` pixels, labels `[B, P]`) or None,
        which feeds a single padding point; mask_prompt `[B, Hm, Wm, 1]`, resized (bilinear,
        antialiased) to the prompt encoder's mask size when it differs. With multimask output the
        mask, high-res mask and token with the highest predicted IoU are selected. Where the object
        score is ≤ 0 the masks are NO_OBJ_SCORE and the pointer is `no_obj_ptr`.
        """
        prompt_encoder = self.prompt_encoder
        b = features.shape[0]
        if points is None:
            points = (jnp.zeros((b, 1, 2), jnp.float32), jnp.full((b, 1), -1, jnp.int32))
        if mask_prompt is not None:
            size = prompt_encoder.mask_size
            if mask_prompt.shape[1:3] != (size, size):
                mask_prompt = resize_bilinear(mask_prompt.astype(jnp.float32), size, size, antialias=True)
        sparse, dense = prompt_encoder(points=points, boxes=None, masks=mask_prompt)
        out = self.mask_decoder(
            features, prompt_encoder.dense_pe(), sparse, dense, high_res, multimask_output=multimask_output
        )
        present = out.object_score_logits > 0  # [B, 1]
        low_res_multimasks = jnp.where(present[:, :, None, None], out.masks, NO_OBJ_SCORE).astype(jnp.float32)
        s = prompt_encoder.image_size
        high_res_multimasks = resize_bilinear(low_res_multimasks, s, s)

        sam_token = out.sam_tokens[:, 0]
        if multimask_output:
            best = jnp.argmax(out.ious, axis=-1)
            low_res_masks = jnp.take_along_axis(low_res_multimasks, best[:, None, None, None], axis=-1)
            high_res_masks = jnp.take_along_axis(high_res_multimasks, best[:, None, None, None], axis=-1)
            if out.sam_tokens.shape[1] > 1:
                sam_token = jnp.take_along_axis(out.sam_tokens, best[:, None, None], axis=1)[:, 0]
        else:
            low_res_masks, high_res_masks = low_res_multimasks, high_res_multimasks

        obj_ptr = self._blend_no_obj(self.obj_ptr_proj(sam_token), present)
        return SamHeadsOutput(
            low_res_multimasks,
            high_res_multimasks,
            out.ious,
            low_res_masks,
            high_res_masks,
            obj_ptr,
            out.object_score_logits,
        )

    def mask_as_output(
        self, features: jax.Array, high_res: tuple[jax.Array, jax.Array], mask: jax.Array
    ) -> SamHeadsOutput:
        """Upstream `_use_mask_as_output`: a given mask becomes the output.

        mask `[B, Hm, Wm, 1]` (float or bool) at the memory encoder's mask size (16 × the grid,
        1152² in the tracker). The outputs are the mask as logits ±10 at its own size (high-res)
        and resized to `Hm // backbone_stride · 4` (low-res, antialiased: upstream's 328² for
        1152², which the predictor and training discard), IoU 1, object score ±10 from whether the mask has any positive
        pixel, and the pointer the SAM heads decode from the down-sampled mask prompt on the raw
        `features` (blended with no_obj_ptr twice, as upstream).
        """
        mask = mask.astype(jnp.float32)
        b, hm, wm, _ = mask.shape
        high_res_masks = mask * _MASK_SCALE + _MASK_BIAS
        stride = self.backbone_stride
        low_res_masks = resize_bilinear(high_res_masks, hm // stride * 4, wm // stride * 4, antialias=True)
        ious = jnp.ones((b, 1), jnp.float32)
        heads = self.sam_heads(
            features, high_res, mask_prompt=self.mask_downsample(mask), multimask_output=False
        )
        present = jnp.any(mask.reshape(b, -1) > 0.0, axis=1)[:, None]
        object_score_logits = _MASK_SCALE * present.astype(jnp.float32) + _MASK_BIAS
        obj_ptr = self._blend_no_obj(heads.obj_ptr, present)
        return SamHeadsOutput(
            low_res_masks, high_res_masks, ious, low_res_masks, high_res_masks, obj_ptr, object_score_logits
        )

    def _blend_no_obj(self, obj_ptr: jax.Array, present: jax.Array) -> jax.Array:
        """The pointer `[B, C]` where `present` `[B, 1]` holds, else `no_obj_ptr`."""
        return jnp.where(present, obj_ptr, self.no_obj_ptr[...].astype(obj_ptr.dtype))

    def encode_memory(
        self,
        pix_feat: jax.Array,
        high_res_masks: jax.Array,
        object_score_logits: jax.Array,
        *,
        is_mask_from_pts: bool,
        non_overlap_masks: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        """One frame's predictions -> its memory (upstream `_encode_new_memory` at eval).

        pix_feat: the raw (not memory-conditioned) level-2 feature `[B, H, W, d]`; high_res_masks:
        mask logits `[B, Hm, Wm, 1]`; object_score_logits: `[B, 1]`. Masks from clicks are
        binarised (logit > 0), others pass through a sigmoid; either is mapped to `20·m − 10`.
        `non_overlap_masks` is upstream's `non_overlap_masks_for_mem_enc` (False in SAM3): B is
        then the objects of one frame and overlaps go to the top scorer. `no_obj_embed_spatial` is
        added to the memory of objects judged absent (logit ≤ 0). Returns (features, pos), each
        `[B, H, W, mem_dim]`.
        """
        masks = high_res_masks.astype(jnp.float32)
        if non_overlap_masks and masks.shape[0] > 1:
            masks = keep_top_object(masks)
        masks = (masks > 0).astype(jnp.float32) if is_mask_from_pts else jax.nn.sigmoid(masks)
        masks = masks * _MASK_SCALE + _MASK_BIAS
        features, pos = self.memory_encoder(pix_feat, masks, skip_mask_sigmoid=True)
        absent = (object_score_logits <= 0).astype(features.dtype)[:, None, None, :]
        features = features + absent * self.no_obj_embed_spatial[...].astype(features.dtype)
        return features, pos

    def pointer_pos(self, rel_positions: jax.Array, scale: jax.Array | float) -> jax.Array:
        """Temporal encoding of object pointers (upstream `_get_tpos_enc`): `[...]` -> `[..., mem_dim]`.

        rel_positions: signed frame distances, divided by `scale` (upstream `max_abs_pos − 1`,
        the number of pointers a step reads less one) before the 1-D sine code.
        """
        pos = rel_positions.astype(jnp.float32) / jnp.asarray(scale, jnp.float32)
        return self.obj_ptr_tpos_proj(sine_1d(pos, self.obj_ptr_tpos_proj.in_features))

    def condition(
        self, memory: MemoryPath, frame: FrameFeatures, bank: MemoryBank, sel: Selection
    ) -> jax.Array:
        """The frame's level-2 feature conditioned on the selected memories -> `[O, g, g, d]`.

        frame: batch 1 (broadcast to the O objects of `sel`); each selected memory frame gets its
        temporal encoding (`maskmem_tpos_enc[frame_tpos]`), each pointer its `pointer_pos`, and
        pointers are split into `C / Cm` tokens of the memory width.
        """
        o = sel.frame_slot.shape[0]
        frame = frame.expand(o)
        _, gh, gw, d = frame.feat.shape
        mem_dim = bank.tokens.shape[-1]
        compute = frame.feat.dtype
        frames, pointers = bank.read(sel)
        tpos = self.maskmem_tpos_enc[...][sel.frame_tpos].reshape(o, -1, 1, mem_dim)
        frames_pos = (bank.tokens_pos[None, None] + tpos).astype(compute)
        per_pointer = pointers.shape[-1] // mem_dim
        pointer_pos = self.pointer_pos(sel.pointer_rel, sel.pointer_scale)
        out = memory(
            frame.feat.reshape(o, gh * gw, d),
            frame.pos.reshape(o, gh * gw, d),
            query_grid=(gh, gw),
            frames=frames.astype(compute),
            frames_pos=frames_pos,
            frame_valid=sel.frame_valid,
            # Pointer p becomes tokens p·r .. p·r + r − 1 (its channel chunks).
            pointers=pointers.reshape(o, -1, mem_dim).astype(compute),
            pointers_pos=jnp.repeat(pointer_pos, per_pointer, axis=1).astype(compute),
            pointer_valid=jnp.repeat(sel.pointer_valid, per_pointer, axis=1),
        )
        return out.reshape(o, gh, gw, d)

    def tracked_heads(self, conditioned: jax.Array, frame: FrameFeatures) -> SamHeadsOutput:
        """SAM heads of a tracked frame: memory-conditioned features `[O, g, g, d]` and the frame
        (batch 1), 3-mask output with argmax-IoU selection."""
        return self.sam_heads(conditioned, frame.expand(conditioned.shape[0]).high_res, multimask_output=True)

    def tracked_memory(self, frame: FrameFeatures, heads: SamHeadsOutput) -> tuple[jax.Array, jax.Array]:
        """The memory a tracked frame leaves (raw features and pos `[O, g, g, Cm]`), from its predicted
        high-res mask (sigmoid, `20·m − 10`) and object score; frame: batch 1."""
        feat = frame.expand(heads.obj_ptr.shape[0]).feat
        return self.encode_memory(
            feat, heads.high_res_masks, heads.object_score_logits, is_mask_from_pts=False
        )

    # ------------------------------------------------------------------------------------------
    # whole steps

    def track_step(
        self, memory: MemoryPath, frame: FrameFeatures, bank: MemoryBank, sel: Selection
    ) -> tuple[StepOutput, MemoryBank]:
        """Track every object one frame (upstream `track_step` on a propagated frame, at eval).

        Memory attention over the selected memories, SAM heads with the 3-mask output and argmax-IoU
        selection, then the new memory from the predicted high-res mask, which is compressed by the
        memory path and written for the objects marked in `sel.write`.
        """
        heads = self.tracked_heads(self.condition(memory, frame, bank, sel), frame)
        tokens, tokens_pos = memory.compress(*self.tracked_memory(frame, heads))
        bank = bank.write(
            tokens, tokens_pos, heads.obj_ptr, sel.write_slot, sel.write_pointer_slot, sel.write
        )
        scores = heads.object_score_logits[:, 0]
        iou = jnp.max(heads.ious, axis=-1)
        presence = jnp.where(scores > 0, 2.0 * jax.nn.sigmoid(scores) - 1.0, 0.0)
        return StepOutput(heads.low_res_masks[..., 0], heads.obj_ptr, scores, iou, presence), bank

    def mask_prompt(self, frame: FrameFeatures, mask: jax.Array) -> PromptOutput:
        """A mask prompt (upstream `_use_mask_as_output`): mask `[1, 16g, 16g, 1]` in [0, 1].

        The low-res mask is left to the caller (upstream replaces it by the video-resolution mask).
        """
        g = frame.feat.shape[1]
        out = self.mask_as_output(frame.feat, frame.high_res, mask)
        return PromptOutput(
            jnp.zeros((1, 4 * g, 4 * g), jnp.float32),
            out.obj_ptr,
            out.object_score_logits[:, 0],
            out.ious[:, 0],
        )

    def click_prompt(
        self,
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
        feat = frame.feat + self.no_mem_embed[...].reshape(1, 1, 1, -1).astype(frame.feat.dtype)
        prev = None if prev_logits is None else jnp.clip(prev_logits, -_PREV_LOGITS_CLAMP, _PREV_LOGITS_CLAMP)
        heads = self.sam_heads(
            feat,
            frame.high_res,
            points=(coords, labels),
            mask_prompt=None if prev is None else prev[..., None],
            multimask_output=multimask_output,
        )
        return PromptOutput(
            heads.low_res_masks[..., 0],
            heads.obj_ptr,
            heads.object_score_logits[:, 0],
            jnp.max(heads.ious, -1),
        )

    def prompt_masks(self, low_res_masks: jax.Array, prompted: jax.Array) -> jax.Array:
        """The prompted objects' consolidated low-res logits `[O, 4g, 4g]` up-sampled to the image size
        `[O, S, S, 1]` (NO_OBJ_SCORE for the objects not prompted on the frame)."""
        s = self.prompt_encoder.image_size
        masks = jnp.where(prompted[:, None, None], low_res_masks, NO_OBJ_SCORE)[..., None]
        return resize_bilinear(masks.astype(jnp.float32), s, s)

    def prompt_top(self, low_res_masks: jax.Array, prompted: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per pixel, the highest prompted logit `[S, S]` and the (first) object holding it `[S, S]`
        int32: what `prompt_memory` needs to keep objects from overlapping when the objects of a
        frame are encoded in several batches."""
        masks = self.prompt_masks(low_res_masks, prompted)[..., 0]
        return jnp.max(masks, axis=0), jnp.argmax(masks, axis=0).astype(jnp.int32)

    def prompt_memory(
        self,
        memory: MemoryPath,
        frame: FrameFeatures,
        low_res_masks: jax.Array,
        object_score_logits: jax.Array,
        prompted: jax.Array,
        top: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        """Memories of a prompted frame (upstream `propagate_in_video_preflight`, run_mem_encoder=True).

        low_res_masks `[O, 4g, 4g]` (the consolidated prompt outputs), object_score_logits `[O]`,
        prompted `[O]` bool, top `[S, S]` int32: per pixel, the row of the top-scoring prompted
        object of the frame (`prompt_top`; another batch's object: any value outside 0..O-1). The
        masks are up-sampled to the image size, only the top object keeps each pixel (upstream's
        non-overlap constraint, `keep_top_object`), and they are binarised before encoding.
        Returns the compressed (tokens, tokens_pos), each `[O, N, Cm]`.
        """
        o = low_res_masks.shape[0]
        masks = self.prompt_masks(low_res_masks, prompted)
        keep = top[None, :, :, None] == jnp.arange(o)[:, None, None, None]
        masks = jnp.where(keep, masks, jnp.minimum(masks, -10.0))
        features, pos = self.encode_memory(
            frame.expand(o).feat, masks, object_score_logits[:, None], is_mask_from_pts=True
        )
        return memory.compress(features, pos)


def expected_param_shapes(cfg: TrackerConfig) -> dict[str, tuple[int, ...]]:
    """`{es3 path: shape}` of every tracker parameter, computed without allocating any."""
    return abstract_shapes(lambda: SAM3Tracker(cfg, rngs=nnx.Rngs(0)))


def build_tracker(
    cfg: TrackerConfig, params: Mapping, *, dtype: Dtype = jnp.float32, source: str = ""
) -> SAM3Tracker:
    """A `SAM3Tracker` holding `params` (nested dict, e.g. `weights.load(...).tracker`), strictly;
    with SAM3's memory attention where `params` hold one."""
    teacher_memory = "memory_attention" in params
    return bind(
        lambda: SAM3Tracker(cfg, rngs=nnx.Rngs(0), dtype=dtype, teacher_memory=teacher_memory), params, source
    )
