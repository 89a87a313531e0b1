"""SAM heads of the SAM3 tracker: the prompt encoder and the two-way mask decoder.

Upstream: `sam3/sam/prompt_encoder.py`, `sam3/sam/mask_decoder.py`, `sam3/sam/transformer.py`, at
inference. The decoder is configured as the tracker builds it: high-resolution skip features,
sigmoid IoU head, object-score MLP, multimask tokens for the object pointer, and the dynamic
stability fallback for single-mask output. `SAM3Tracker.sam_heads` runs them on a frame.

Everything is channels-last: features `[B, H, W, C]`, mask logits `[B, H, W, M]` (M masks).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from es3_jax.nn.attention import Attention
from es3_jax.nn.layers import MLP, ConvTranspose2x2, Dtype, conv, gelu, layer_norm, linear
from es3_jax.nn.position_encoding import random_fourier

# Label −1 is padding ("not a point"); 0/1 negative/positive clicks; 2/3 box corners.
_NUM_POINT_LABELS = 4


class PromptEncoder(nnx.Module):
    """SAM prompt encoder: points and boxes -> sparse tokens, a mask prompt -> a dense map.

    Points and boxes are in input-image pixels of an `image_size²` frame; the dense output
    lives on the `grid²` feature grid and a mask prompt is `(4·grid)²`.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        image_size: int = 1008,
        grid: int = 72,
        mask_in_chans: int = 16,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
    ):
        self.embed_dim = embed_dim
        self.image_size = image_size
        self.grid = grid
        self.dtype = dtype
        normal = nnx.initializers.normal(1.0)
        self.pe_gaussian = nnx.Param(normal(rngs.params(), (2, embed_dim // 2), jnp.float32))
        self.point_embeddings = nnx.List(
            [nnx.Param(normal(rngs.params(), (1, embed_dim), jnp.float32)) for _ in range(_NUM_POINT_LABELS)]
        )
        self.not_a_point_embed = nnx.Param(normal(rngs.params(), (1, embed_dim), jnp.float32))
        self.no_mask_embed = nnx.Param(normal(rngs.params(), (1, embed_dim), jnp.float32))
        hidden = mask_in_chans // 4
        self.mask_conv1 = conv(1, hidden, 2, stride=2, rngs=rngs, dtype=dtype)
        self.mask_norm1 = layer_norm(hidden, eps=1e-6, rngs=rngs, dtype=dtype)
        self.mask_conv2 = conv(hidden, mask_in_chans, 2, stride=2, rngs=rngs, dtype=dtype)
        self.mask_norm2 = layer_norm(mask_in_chans, eps=1e-6, rngs=rngs, dtype=dtype)
        self.mask_conv3 = conv(mask_in_chans, embed_dim, 1, rngs=rngs, dtype=dtype)

    @property
    def mask_size(self) -> int:
        """Side of the mask prompt the encoder takes (`4·grid`)."""
        return 4 * self.grid

    def dense_pe(self) -> jax.Array:
        """Random Fourier code of the feature-grid pixel centres -> `[1, grid, grid, embed_dim]` float32."""
        centres = (jnp.arange(self.grid, dtype=jnp.float32) + 0.5) / self.grid
        xy = jnp.stack(jnp.meshgrid(centres, centres, indexing="xy"), axis=-1)
        return random_fourier(xy, self.pe_gaussian[...])[None]

    def embed_points(self, coords: jax.Array, labels: jax.Array, *, pad: bool) -> jax.Array:
        """coords `[B, P, 2]` (x, y pixels), labels `[B, P]` -> `[B, P (+1 when pad), embed_dim]`.

        `pad` appends a label −1 point, which upstream does whenever no box is given.
        """
        coords = coords.astype(jnp.float32) + 0.5
        labels = labels.astype(jnp.int32)
        if pad:
            b = coords.shape[0]
            coords = jnp.concatenate([coords, jnp.zeros((b, 1, 2), jnp.float32)], axis=1)
            labels = jnp.concatenate([labels, jnp.full((b, 1), -1, jnp.int32)], axis=1)
        emb = random_fourier(coords / self.image_size, self.pe_gaussian[...])
        labels = labels[..., None]
        emb = jnp.where(labels == -1, self.not_a_point_embed[...], emb)
        for k, point_embed in enumerate(self.point_embeddings):
            emb = jnp.where(labels == k, emb + point_embed[...], emb)
        return emb.astype(self.dtype)

    def embed_boxes(self, boxes: jax.Array) -> jax.Array:
        """boxes `[B, 4]` as (x0, y0, x1, y1) pixels -> `[B, 2, embed_dim]` (the two corner tokens)."""
        corners = boxes.astype(jnp.float32).reshape(-1, 2, 2) + 0.5
        emb = random_fourier(corners / self.image_size, self.pe_gaussian[...])
        corner_embeds = jnp.concatenate([self.point_embeddings[k][...] for k in (2, 3)], axis=0)
        return (emb + corner_embeds).astype(self.dtype)

    def embed_mask(self, masks: jax.Array) -> jax.Array:
        """masks `[B, 4h, 4w, 1]` -> `[B, h, w, embed_dim]`."""
        x = gelu(self.mask_norm1(self.mask_conv1(masks)))
        x = gelu(self.mask_norm2(self.mask_conv2(x)))
        return self.mask_conv3(x)

    def __call__(
        self,
        points: tuple[jax.Array, jax.Array] | None = None,
        boxes: jax.Array | None = None,
        masks: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """-> (sparse `[B, N, embed_dim]`, dense `[B, grid, grid, embed_dim]`).

        points: (coords `[B, P, 2]` pixels, labels `[B, P]` in −1..3); boxes `[B, 4]`;
        masks `[B, 4·grid, 4·grid, 1]` (logits). N = P + 1 (padding) without boxes, P + 2 with.
        """
        if points is not None:
            b = points[0].shape[0]
        elif boxes is not None:
            b = boxes.shape[0]
        elif masks is not None:
            b = masks.shape[0]
        else:
            b = 1
        parts = [jnp.zeros((b, 0, self.embed_dim), self.dtype)]
        if points is not None:
            parts.append(self.embed_points(*points, pad=boxes is None))
        if boxes is not None:
            parts.append(self.embed_boxes(boxes))
        sparse = jnp.concatenate(parts, axis=1)
        if masks is not None:
            dense = self.embed_mask(masks)
        else:
            dense = jnp.broadcast_to(
                self.no_mask_embed[...].astype(self.dtype), (b, self.grid, self.grid, self.embed_dim)
            )
        return sparse, dense


class MLPBlock(nnx.Module):
    """The two-way transformer's feed-forward block: `lin2(relu(lin1(x)))`."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        self.lin1 = linear(dim, hidden, rngs=rngs, dtype=dtype)
        self.lin2 = linear(hidden, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lin2(jax.nn.relu(self.lin1(x)))


class TwoWayAttentionBlock(nnx.Module):
    """Post-norm block: token self-attention, token→image, MLP, image→token cross-attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample: int,
        *,
        skip_first_layer_pe: bool,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
    ):
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = Attention(dim, num_heads, rngs=rngs, dtype=dtype)
        self.norm1 = layer_norm(dim, eps=1e-5, rngs=rngs, dtype=dtype)
        self.cross_attn_token_to_image = Attention(
            dim, num_heads, downsample_rate=attention_downsample, rngs=rngs, dtype=dtype
        )
        self.norm2 = layer_norm(dim, eps=1e-5, rngs=rngs, dtype=dtype)
        self.mlp = MLPBlock(dim, mlp_dim, rngs=rngs, dtype=dtype)
        self.norm3 = layer_norm(dim, eps=1e-5, rngs=rngs, dtype=dtype)
        self.norm4 = layer_norm(dim, eps=1e-5, rngs=rngs, dtype=dtype)
        self.cross_attn_image_to_token = Attention(
            dim, num_heads, downsample_rate=attention_downsample, rngs=rngs, dtype=dtype
        )

    def __call__(
        self, queries: jax.Array, keys: jax.Array, query_pe: jax.Array, key_pe: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """queries/query_pe `[B, Nq, C]`, keys/key_pe `[B, Nk, C]` -> (queries, keys)."""
        if self.skip_first_layer_pe:
            # The first block's queries *are* the prompt tokens, so upstream replaces instead of adding.
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    """SAM's two-way transformer: tokens and image tokens attend to each other, then a final token→image."""

    def __init__(
        self,
        depth: int = 2,
        dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample: int = 2,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
    ):
        self.layers = nnx.List(
            [
                TwoWayAttentionBlock(
                    dim,
                    num_heads,
                    mlp_dim,
                    attention_downsample,
                    skip_first_layer_pe=i == 0,
                    rngs=rngs,
                    dtype=dtype,
                )
                for i in range(depth)
            ]
        )
        self.final_attn_token_to_image = Attention(
            dim, num_heads, downsample_rate=attention_downsample, rngs=rngs, dtype=dtype
        )
        self.norm_final_attn = layer_norm(dim, eps=1e-5, rngs=rngs, dtype=dtype)

    def __call__(
        self, image: jax.Array, image_pe: jax.Array, tokens: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """image/image_pe `[B, H, W, C]`, tokens `[B, N, C]` -> (tokens `[B, N, C]`, image `[B, H·W, C]`)."""
        b, h, w, c = image.shape
        keys = image.reshape(b, h * w, c)
        key_pe = image_pe.reshape(b, h * w, c).astype(keys.dtype)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class DecoderOutput(NamedTuple):
    """Mask-decoder outputs; M = 3 (multimask), or 1 (single mask)."""

    masks: jax.Array  # [B, 4H, 4W, M] mask logits
    ious: jax.Array  # [B, M] predicted IoU (sigmoid)
    sam_tokens: jax.Array  # [B, M or 1, C] output tokens the object pointer is taken from
    object_score_logits: jax.Array  # [B, 1]


class MaskDecoder(nnx.Module):
    """SAM2-style mask decoder with high-resolution skip features, as the SAM3 tracker builds it.

    Tokens are `[obj_score, iou, mask_0..num_multimask]` followed by the sparse prompt tokens.
    Mask 0 is the single-mask output; masks 1..num_multimask the ambiguity-aware set.
    """

    def __init__(
        self,
        dim: int = 256,
        num_multimask_outputs: int = 3,
        depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample: int = 2,
        iou_head_depth: int = 3,
        iou_head_hidden: int = 256,
        *,
        rngs: nnx.Rngs,
        stability_delta: float = 0.05,
        stability_thresh: float = 0.98,
        dtype: Dtype = jnp.float32,
    ):
        self.num_mask_tokens = num_multimask_outputs + 1
        self.stability_delta = stability_delta
        self.stability_thresh = stability_thresh
        self.dtype = dtype
        self.transformer = TwoWayTransformer(
            depth, dim, num_heads, mlp_dim, attention_downsample, rngs=rngs, dtype=dtype
        )
        normal = nnx.initializers.normal(1.0)
        self.iou_token = nnx.Param(normal(rngs.params(), (1, dim), jnp.float32))
        self.mask_tokens = nnx.Param(normal(rngs.params(), (self.num_mask_tokens, dim), jnp.float32))
        self.obj_score_token = nnx.Param(normal(rngs.params(), (1, dim), jnp.float32))
        self.upscale_conv1 = ConvTranspose2x2(dim, dim // 4, rngs=rngs, dtype=dtype)
        self.upscale_norm = layer_norm(dim // 4, eps=1e-6, rngs=rngs, dtype=dtype)
        self.upscale_conv2 = ConvTranspose2x2(dim // 4, dim // 8, rngs=rngs, dtype=dtype)
        self.conv_s0 = conv(dim, dim // 8, 1, rngs=rngs, dtype=dtype)
        self.conv_s1 = conv(dim, dim // 4, 1, rngs=rngs, dtype=dtype)
        self.output_hypernetworks_mlps = nnx.List(
            [MLP([dim, dim, dim, dim // 8], rngs=rngs, dtype=dtype) for _ in range(self.num_mask_tokens)]
        )
        self.iou_prediction_head = MLP(
            [dim] + [iou_head_hidden] * (iou_head_depth - 1) + [self.num_mask_tokens], rngs=rngs, dtype=dtype
        )
        self.pred_obj_score_head = MLP([dim, dim, dim, 1], rngs=rngs, dtype=dtype)

    def project_high_res(self, feat_s0: jax.Array, feat_s1: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Neck levels 0/1 `[B, 4H, 4W, C]`, `[B, 2H, 2W, C]` -> the decoder's skip features.

        Upstream applies these once per frame when it stores the backbone features, not inside the decoder.
        Returns `[B, 4H, 4W, C/8]`, `[B, 2H, 2W, C/4]`.
        """
        return self.conv_s0(feat_s0), self.conv_s1(feat_s1)

    def predict_masks(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse: jax.Array,
        dense: jax.Array,
        high_res: tuple[jax.Array, jax.Array],
    ) -> DecoderOutput:
        """Every mask token's output (M = num_multimask + 1), before any selection.

        image_embeddings/dense `[B, H, W, C]`, image_pe `[1, H, W, C]`, sparse `[B, N, C]`,
        high_res = projected (feat_s0 `[B, 4H, 4W, C/8]`, feat_s1 `[B, 2H, 2W, C/4]`).
        `sam_tokens` holds all mask tokens `[B, M, C]`.
        """
        b, h, w, c = image_embeddings.shape
        output_tokens = jnp.concatenate(
            [self.obj_score_token[...], self.iou_token[...], self.mask_tokens[...]], axis=0
        ).astype(self.dtype)
        tokens = jnp.concatenate(
            [jnp.broadcast_to(output_tokens, (b, *output_tokens.shape)), sparse.astype(self.dtype)], axis=1
        )
        src = (image_embeddings + dense).astype(self.dtype)
        pos = jnp.broadcast_to(image_pe, (b, h, w, c))
        hs, src = self.transformer(src, pos, tokens)
        mask_tokens_out = hs[:, 2 : 2 + self.num_mask_tokens]

        feat_s0, feat_s1 = high_res
        up = gelu(self.upscale_norm(self.upscale_conv1(src.reshape(b, h, w, c)) + feat_s1))
        up = gelu(self.upscale_conv2(up) + feat_s0)
        hyper = jnp.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], axis=1
        )
        masks = jnp.einsum("bkc,bhwc->bhwk", hyper, up)
        ious = jax.nn.sigmoid(self.iou_prediction_head(hs[:, 1]))
        obj_logits = self.pred_obj_score_head(hs[:, 0])
        return DecoderOutput(masks, ious, mask_tokens_out, obj_logits)

    def stable_single_mask(self, masks: jax.Array, ious: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Dynamic multimask via stability: masks `[B, H, W, M]`, ious `[B, M]` -> `[B, H, W, 1]`, `[B, 1]`.

        Mask 0 is kept when its stability |{m > δ}| / |{m > −δ}| reaches the threshold (1 when
        nothing exceeds −δ); otherwise the multimask output with the highest predicted IoU is used.
        """
        single = masks[..., 0].astype(jnp.float32)
        area_i = jnp.sum(single > self.stability_delta, axis=(1, 2)).astype(jnp.float32)
        area_u = jnp.sum(single > -self.stability_delta, axis=(1, 2)).astype(jnp.float32)
        stability = jnp.where(area_u > 0, area_i / jnp.maximum(area_u, 1.0), 1.0)
        is_stable = stability >= self.stability_thresh
        best = 1 + jnp.argmax(ious[:, 1:], axis=-1)
        best_masks = jnp.take_along_axis(masks, best[:, None, None, None], axis=-1)
        best_ious = jnp.take_along_axis(ious, best[:, None], axis=-1)
        out_masks = jnp.where(is_stable[:, None, None, None], masks[..., :1], best_masks)
        out_ious = jnp.where(is_stable[:, None], ious[:, :1], best_ious)
        return out_masks, out_ious

    def __call__(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse: jax.Array,
        dense: jax.Array,
        high_res: tuple[jax.Array, jax.Array],
        *,
        multimask_output: bool,
        stability_fallback: bool = True,
    ) -> DecoderOutput:
        """Predict and select masks as upstream `MaskDecoder.forward` (inputs as in `predict_masks`).

        multimask: masks/IoUs/tokens 1..3. Single: mask 0 with the stability fallback (upstream
        applies it in eval mode only; `stability_fallback=False` gives its training-mode output),
        and always token 0 for the object pointer.
        """
        out = self.predict_masks(image_embeddings, image_pe, sparse, dense, high_res)
        if multimask_output:
            return DecoderOutput(
                out.masks[..., 1:], out.ious[:, 1:], out.sam_tokens[:, 1:], out.object_score_logits
            )
        if stability_fallback:
            masks, ious = self.stable_single_mask(out.masks, out.ious)
        else:
            masks, ious = out.masks[..., :1], out.ious[:, :1]
        return DecoderOutput(masks, ious, out.sam_tokens[:, :1], out.object_score_logits)
