"""Declarative key tables between PyTorch checkpoints and es3 parameter trees.

A table is a list of `Rule`s, one per parameter (patterns with `{i}`-style placeholders stand
for every index), grouped by component. The same table serves both directions:

* import walks the torch keys: each must match exactly one rule, or be on the component's
  ignore list, and the value is transformed into the JAX layout;
* export walks the es3 parameter paths and applies the inverse transform.

es3 paths are dotted strings (`memory_attention.layers.0.self_attn.q_proj.kernel`); integer
segments are list indices in the NNX module tree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Transform:
    """A layout change from torch to JAX (`to_jax`) and back (`to_torch`)."""

    name: str
    perm: tuple[int, ...] | None = None

    def to_jax(self, x: np.ndarray) -> np.ndarray:
        return x if self.perm is None else np.ascontiguousarray(np.transpose(x, self.perm))

    def to_torch(self, x: np.ndarray) -> np.ndarray:
        return x if self.perm is None else np.ascontiguousarray(np.transpose(x, np.argsort(self.perm)))

    def jax_shape(self, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.perm is None:
            return tuple(torch_shape)
        if len(torch_shape) != len(self.perm):
            return tuple(torch_shape)  # reported as a shape mismatch by the caller
        return tuple(torch_shape[p] for p in self.perm)

    def torch_shape(self, jax_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.perm is None or len(jax_shape) != len(self.perm):
            return tuple(jax_shape)
        return tuple(jax_shape[i] for i in np.argsort(self.perm))


IDENTITY = Transform("identity")
LINEAR = Transform("linear", (1, 0))  # [out, in] -> [in, out]
CONV = Transform("conv", (2, 3, 1, 0))  # [O, I, kh, kw] -> [kh, kw, I, O]
CONV_T = Transform("conv_transpose", (2, 3, 0, 1))  # [I, O, kh, kw] -> [kh, kw, I, O]


@dataclass(frozen=True)
class Rule:
    torch: str
    jax: str
    transform: Transform = IDENTITY


def param(t: str, j: str) -> list[Rule]:
    return [Rule(t, j)]


def linear(t: str, j: str) -> list[Rule]:
    return [Rule(f"{t}.weight", f"{j}.kernel", LINEAR), Rule(f"{t}.bias", f"{j}.bias")]


def conv(t: str, j: str) -> list[Rule]:
    return [Rule(f"{t}.weight", f"{j}.kernel", CONV), Rule(f"{t}.bias", f"{j}.bias")]


def conv_t(t: str, j: str) -> list[Rule]:
    return [Rule(f"{t}.weight", f"{j}.kernel", CONV_T), Rule(f"{t}.bias", f"{j}.bias")]


def norm(t: str, j: str) -> list[Rule]:
    return [Rule(f"{t}.weight", f"{j}.scale"), Rule(f"{t}.bias", f"{j}.bias")]


def attention(t: str, j: str) -> list[Rule]:
    return [r for p in ("q", "k", "v", "out") for r in linear(f"{t}.{p}_proj", f"{j}.{p}_proj")]


def mlp(t: str, j: str, num_layers: int) -> list[Rule]:
    return [r for n in range(num_layers) for r in linear(f"{t}.layers.{n}", f"{j}.layers.{n}")]


@dataclass(frozen=True)
class Component:
    """One module's rules, relative to a torch key prefix and an es3 path prefix."""

    name: str
    torch_prefix: str
    jax_prefix: str
    rules: tuple[Rule, ...]
    ignored: tuple[str, ...] = field(default=())  # torch patterns upstream has and es3 does not use


def _rules(*groups: Iterable[Rule]) -> tuple[Rule, ...]:
    return tuple(r for g in groups for r in g)


NECK = Component(
    "neck",
    "detector.backbone.vision_backbone.sam2_convs.",
    "neck.",
    _rules(
        conv_t("0.dconv_2x2_0", "levels.0.dconv_2x2_0"),
        conv_t("0.dconv_2x2_1", "levels.0.dconv_2x2_1"),
        conv_t("1.dconv_2x2", "levels.1.dconv_2x2"),
        *(conv(f"{level}.conv_1x1", f"levels.{level}.conv_1x1") for level in range(3)),
        *(conv(f"{level}.conv_3x3", f"levels.{level}.conv_3x3") for level in range(3)),
    ),
    # Level 3 (stride 28) is computed upstream and discarded by the tracker.
    ignored=("3.conv_1x1.weight", "3.conv_1x1.bias", "3.conv_3x3.weight", "3.conv_3x3.bias"),
)

MEMORY_ENCODER = Component(
    "memory_encoder",
    "tracker.maskmem_backbone.",
    "memory_encoder.",
    _rules(
        *(conv(f"mask_downsampler.encoder.{3 * s}", f"mask_downsampler.convs.{s}") for s in range(4)),
        *(norm(f"mask_downsampler.encoder.{3 * s + 1}", f"mask_downsampler.norms.{s}") for s in range(4)),
        conv("mask_downsampler.encoder.12", "mask_downsampler.proj"),
        conv("pix_feat_proj", "pix_feat_proj"),
        conv("fuser.layers.{i}.dwconv", "fuser.layers.{i}.dwconv"),
        norm("fuser.layers.{i}.norm", "fuser.layers.{i}.norm"),
        linear("fuser.layers.{i}.pwconv1", "fuser.layers.{i}.pwconv1"),
        linear("fuser.layers.{i}.pwconv2", "fuser.layers.{i}.pwconv2"),
        param("fuser.layers.{i}.gamma", "fuser.layers.{i}.gamma"),
        conv("out_proj", "out_proj"),
    ),
)

MEMORY_ATTENTION = Component(
    "memory_attention",
    "tracker.transformer.encoder.",
    "memory_attention.",
    _rules(
        attention("layers.{i}.self_attn", "layers.{i}.self_attn"),
        attention("layers.{i}.cross_attn_image", "layers.{i}.cross_attn_image"),
        linear("layers.{i}.linear1", "layers.{i}.linear1"),
        linear("layers.{i}.linear2", "layers.{i}.linear2"),
        norm("layers.{i}.norm1", "layers.{i}.norm1"),
        norm("layers.{i}.norm2", "layers.{i}.norm2"),
        norm("layers.{i}.norm3", "layers.{i}.norm3"),
        norm("norm", "norm"),
    ),
)

PROMPT_ENCODER = Component(
    "prompt_encoder",
    "tracker.sam_prompt_encoder.",
    "prompt_encoder.",
    _rules(
        param("pe_layer.positional_encoding_gaussian_matrix", "pe_gaussian"),
        param("point_embeddings.{k}.weight", "point_embeddings.{k}"),
        param("not_a_point_embed.weight", "not_a_point_embed"),
        param("no_mask_embed.weight", "no_mask_embed"),
        conv("mask_downscaling.0", "mask_conv1"),
        norm("mask_downscaling.1", "mask_norm1"),
        conv("mask_downscaling.3", "mask_conv2"),
        norm("mask_downscaling.4", "mask_norm2"),
        conv("mask_downscaling.6", "mask_conv3"),
    ),
)

MASK_DECODER = Component(
    "mask_decoder",
    "tracker.sam_mask_decoder.",
    "mask_decoder.",
    _rules(
        attention("transformer.layers.{i}.self_attn", "transformer.layers.{i}.self_attn"),
        attention(
            "transformer.layers.{i}.cross_attn_token_to_image",
            "transformer.layers.{i}.cross_attn_token_to_image",
        ),
        attention(
            "transformer.layers.{i}.cross_attn_image_to_token",
            "transformer.layers.{i}.cross_attn_image_to_token",
        ),
        linear("transformer.layers.{i}.mlp.lin1", "transformer.layers.{i}.mlp.lin1"),
        linear("transformer.layers.{i}.mlp.lin2", "transformer.layers.{i}.mlp.lin2"),
        *(
            norm(f"transformer.layers.{{i}}.norm{n}", f"transformer.layers.{{i}}.norm{n}")
            for n in range(1, 5)
        ),
        attention("transformer.final_attn_token_to_image", "transformer.final_attn_token_to_image"),
        norm("transformer.norm_final_attn", "transformer.norm_final_attn"),
        param("iou_token.weight", "iou_token"),
        param("mask_tokens.weight", "mask_tokens"),
        param("obj_score_token.weight", "obj_score_token"),
        conv_t("output_upscaling.0", "upscale_conv1"),
        norm("output_upscaling.1", "upscale_norm"),
        conv_t("output_upscaling.3", "upscale_conv2"),
        conv("conv_s0", "conv_s0"),
        conv("conv_s1", "conv_s1"),
        mlp("output_hypernetworks_mlps.{k}", "output_hypernetworks_mlps.{k}", 3),
        mlp("iou_prediction_head", "iou_prediction_head", 3),
        mlp("pred_obj_score_head", "pred_obj_score_head", 3),
    ),
)

TRACKER_HEADS = Component(
    "tracker_heads",
    "tracker.",
    "",
    _rules(
        param("maskmem_tpos_enc", "maskmem_tpos_enc"),
        param("no_mem_embed", "no_mem_embed"),
        param("no_obj_ptr", "no_obj_ptr"),
        param("no_obj_embed_spatial", "no_obj_embed_spatial"),
        conv("mask_downsample", "mask_downsample"),
        mlp("obj_ptr_proj", "obj_ptr_proj", 3),
        linear("obj_ptr_tpos_proj", "obj_ptr_tpos_proj"),
    ),
    # Only referenced after a `return` upstream: never used at inference.
    ignored=("no_mem_pos_enc",),
)

# --- STUDENT: the student memory path as the export writes it ---------------------------------
#
# The perceiver keeps EdgeTAM's module names under `tracker.spatial_perceiver.` (`to_kv` fused:
# keys in rows 0..D-1, values in rows D..2D-1; FFNs as `nn.Sequential(LayerNorm, Linear, GELU,
# Linear)`). The student memory attention replaces the teacher's under MEMORY_ATTENTION's own
# keys (`tracker.transformer.encoder.`, any number of layers), so upstream sam3 reads it unchanged.


def _perceiver_linears(t: str) -> list[Rule]:
    return [Rule(f"{t}.{p}.weight", f"{t}.{p}.kernel", LINEAR) for p in ("to_q", "to_kv", "to_out")]


def _perceiver_ff(t: str) -> list[Rule]:
    return [
        *norm(f"{t}.0", f"{t}.norm"),
        Rule(f"{t}.1.weight", f"{t}.up.kernel", LINEAR),
        Rule(f"{t}.3.weight", f"{t}.down.kernel", LINEAR),
    ]


SPATIAL_PERCEIVER = Component(
    "spatial_perceiver",
    "tracker.spatial_perceiver.",
    "spatial_perceiver.",
    _rules(
        param("latents", "latents"),
        param("latents_2d", "latents_2d"),
        norm("layers.{i}.attn.norm_x", "layers.{i}.attn.norm_x"),
        norm("layers.{i}.attn.norm_latents", "layers.{i}.attn.norm_latents"),
        _perceiver_linears("layers.{i}.attn"),
        _perceiver_ff("layers.{i}.ff"),
        norm("layers.{i}.self_attn.norm", "layers.{i}.self_attn.norm"),
        _perceiver_linears("layers.{i}.self_attn"),
        _perceiver_ff("layers.{i}.self_ff"),
        norm("norm", "norm"),
    ),
)

STUDENT_COMPONENTS: tuple[Component, ...] = (SPATIAL_PERCEIVER, MEMORY_ATTENTION)

TRACKER_COMPONENTS: tuple[Component, ...] = (
    NECK,
    MEMORY_ENCODER,
    MEMORY_ATTENTION,
    PROMPT_ENCODER,
    MASK_DECODER,
    TRACKER_HEADS,
    SPATIAL_PERCEIVER,  # present in merged student exports only
)


@dataclass(frozen=True)
class DropLeadingTokens(Transform):
    """Drop the first `n` entries of axis 1: sam3's ViT `pos_embed` `[1, 1 + P², C]` -> `[1, P², C]`.

    Row 0 belongs to a class token the ViT is built without (`retain_cls_token=False`), so it
    never reaches the features. Going back, it is written as zeros.
    """

    name: str = "drop_leading_tokens"
    n: int = 1

    def to_jax(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[:, self.n :])

    def to_torch(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([np.zeros_like(x[:, : self.n]), x], axis=1)

    def jax_shape(self, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(torch_shape) != 3:
            return tuple(torch_shape)  # reported as a shape mismatch by the caller
        return (torch_shape[0], torch_shape[1] - self.n, torch_shape[2])

    def torch_shape(self, jax_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (jax_shape[0], jax_shape[1] + self.n, *jax_shape[2:])


TRUNK = Component(
    "trunk",
    "detector.backbone.vision_backbone.trunk.",
    "trunk.",
    _rules(
        [Rule("pos_embed", "pos_embed", DropLeadingTokens())],
        [Rule("patch_embed.proj.weight", "patch_embed.proj.kernel", CONV)],
        norm("ln_pre", "ln_pre"),
        norm("blocks.{i}.norm1", "blocks.{i}.norm1"),
        linear("blocks.{i}.attn.qkv", "blocks.{i}.attn.qkv"),
        linear("blocks.{i}.attn.proj", "blocks.{i}.attn.proj"),
        norm("blocks.{i}.norm2", "blocks.{i}.norm2"),
        linear("blocks.{i}.mlp.fc1", "blocks.{i}.mlp.fc1"),
        linear("blocks.{i}.mlp.fc2", "blocks.{i}.mlp.fc2"),
    ),
    # Complex64 RoPE tables (persistent buffers), recomputed from the geometry.
    ignored=("blocks.{i}.attn.freqs_cis",),
)

# Everything under these torch prefixes must be consumed or explicitly ignored.
TRACKER_NAMESPACES: tuple[str, ...] = ("tracker.", NECK.torch_prefix)


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _compile(pattern: str) -> re.Pattern[str]:
    parts = _PLACEHOLDER.split(pattern)
    out = []
    for n, part in enumerate(parts):
        out.append(f"(?P<{part}>\\d+)" if n % 2 else re.escape(part))
    return re.compile("".join(out) + "$")


@dataclass(frozen=True)
class _Compiled:
    component: Component
    rule: Rule
    torch_re: re.Pattern[str]
    jax_re: re.Pattern[str]

    @property
    def torch_template(self) -> str:
        return self.component.torch_prefix + self.rule.torch

    @property
    def jax_template(self) -> str:
        return self.component.jax_prefix + self.rule.jax


class KeyTable:
    """A set of components, matched against full torch keys and full es3 paths."""

    def __init__(self, components: Iterable[Component], namespaces: Iterable[str]):
        self.components = tuple(components)
        self.namespaces = tuple(namespaces)
        self._compiled = [
            _Compiled(c, r, _compile(c.torch_prefix + r.torch), _compile(c.jax_prefix + r.jax))
            for c in self.components
            for r in c.rules
        ]
        self._ignored = [_compile(c.torch_prefix + p) for c in self.components for p in c.ignored]

    def consumes(self, torch_key: str) -> bool:
        """Whether the key lies in a namespace es3 reads (so it must be mapped or ignored)."""
        return torch_key.startswith(self.namespaces)

    def is_ignored(self, torch_key: str) -> bool:
        return any(p.match(torch_key) for p in self._ignored)

    def to_jax(self, torch_key: str) -> tuple[str, Transform] | None:
        """The es3 path and transform for a torch key, or None when no rule matches."""
        return self._lookup(torch_key, to_torch=False)

    def to_torch(self, jax_path: str) -> tuple[str, Transform] | None:
        """The torch key and transform for an es3 path, or None when no rule matches."""
        return self._lookup(jax_path, to_torch=True)

    def _lookup(self, name: str, *, to_torch: bool) -> tuple[str, Transform] | None:
        hits = [(c, m) for c in self._compiled if (m := (c.jax_re if to_torch else c.torch_re).match(name))]
        if len(hits) > 1:
            names = ", ".join(c.jax_template if to_torch else c.torch_template for c, _ in hits)
            raise ValueError(f"key table is ambiguous: {name!r} matches {names}")
        if not hits:
            return None
        c, m = hits[0]
        target = c.torch_template if to_torch else c.jax_template
        return target.format(**m.groupdict()), c.rule.transform


TRACKER_TABLE = KeyTable(TRACKER_COMPONENTS, TRACKER_NAMESPACES)
# The student's keys alone, in both directions (export: es3 student params -> torch keys).
STUDENT_TABLE = KeyTable(STUDENT_COMPONENTS, tuple(c.torch_prefix for c in STUDENT_COMPONENTS))
# Read by `es3 embed` (`porting.sam3_checkpoint.port_trunk`), apart from the tracker's table.
TRUNK_TABLE = KeyTable((TRUNK,), (TRUNK.torch_prefix,))


# --- The Hugging Face transformers layout (`Sam3TrackerVideoModel`) -------------------------------
#
# transformers names the same tensors differently. These module-prefix renames translate its
# state dict into the sam3.pt layout (and back), so the tables above serve both layouts.
# Placeholders match list indices; a key is renamed by its longest matching prefix.

TRANSFORMERS_RENAMES: tuple[tuple[str, str], ...] = (
    ("no_memory_embedding", "tracker.no_mem_embed"),
    ("no_memory_positional_encoding", "tracker.no_mem_pos_enc"),
    ("memory_temporal_positional_encoding", "tracker.maskmem_tpos_enc"),
    ("no_object_pointer", "tracker.no_obj_ptr"),
    ("occlusion_spatial_embedding_parameter", "tracker.no_obj_embed_spatial"),
    ("mask_downsample", "tracker.mask_downsample"),
    ("object_pointer_proj.proj_in", "tracker.obj_ptr_proj.layers.0"),
    ("object_pointer_proj.layers.0", "tracker.obj_ptr_proj.layers.1"),
    ("object_pointer_proj.proj_out", "tracker.obj_ptr_proj.layers.2"),
    ("temporal_positional_encoding_projection_layer", "tracker.obj_ptr_tpos_proj"),
    # prompt encoder
    (
        "shared_image_embedding.positional_embedding",
        "tracker.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    ),
    ("prompt_encoder.mask_embed.conv1", "tracker.sam_prompt_encoder.mask_downscaling.0"),
    ("prompt_encoder.mask_embed.layer_norm1", "tracker.sam_prompt_encoder.mask_downscaling.1"),
    ("prompt_encoder.mask_embed.conv2", "tracker.sam_prompt_encoder.mask_downscaling.3"),
    ("prompt_encoder.mask_embed.layer_norm2", "tracker.sam_prompt_encoder.mask_downscaling.4"),
    ("prompt_encoder.mask_embed.conv3", "tracker.sam_prompt_encoder.mask_downscaling.6"),
    ("prompt_encoder.no_mask_embed", "tracker.sam_prompt_encoder.no_mask_embed"),
    ("prompt_encoder.not_a_point_embed", "tracker.sam_prompt_encoder.not_a_point_embed"),
    # mask decoder
    (
        "mask_decoder.transformer.layers.{i}.self_attn.o_proj",
        "tracker.sam_mask_decoder.transformer.layers.{i}.self_attn.out_proj",
    ),
    (
        "mask_decoder.transformer.layers.{i}.cross_attn_token_to_image.o_proj",
        "tracker.sam_mask_decoder.transformer.layers.{i}.cross_attn_token_to_image.out_proj",
    ),
    (
        "mask_decoder.transformer.layers.{i}.cross_attn_image_to_token.o_proj",
        "tracker.sam_mask_decoder.transformer.layers.{i}.cross_attn_image_to_token.out_proj",
    ),
    (
        "mask_decoder.transformer.layers.{i}.mlp.proj_in",
        "tracker.sam_mask_decoder.transformer.layers.{i}.mlp.lin1",
    ),
    (
        "mask_decoder.transformer.layers.{i}.mlp.proj_out",
        "tracker.sam_mask_decoder.transformer.layers.{i}.mlp.lin2",
    ),
    *(
        (
            f"mask_decoder.transformer.layers.{{i}}.layer_norm{n}",
            f"tracker.sam_mask_decoder.transformer.layers.{{i}}.norm{n}",
        )
        for n in range(1, 5)
    ),
    (
        "mask_decoder.transformer.final_attn_token_to_image.o_proj",
        "tracker.sam_mask_decoder.transformer.final_attn_token_to_image.out_proj",
    ),
    (
        "mask_decoder.transformer.layer_norm_final_attn",
        "tracker.sam_mask_decoder.transformer.norm_final_attn",
    ),
    ("mask_decoder.upscale_conv1", "tracker.sam_mask_decoder.output_upscaling.0"),
    ("mask_decoder.upscale_layer_norm", "tracker.sam_mask_decoder.output_upscaling.1"),
    ("mask_decoder.upscale_conv2", "tracker.sam_mask_decoder.output_upscaling.3"),
    *(
        (f"mask_decoder.{head}.{hf}", f"tracker.sam_mask_decoder.{head}.layers.{n}")
        for head in ("output_hypernetworks_mlps.{k}", "iou_prediction_head", "pred_obj_score_head")
        for hf, n in (("proj_in", 0), ("layers.0", 1), ("proj_out", 2))
    ),
    ("mask_decoder", "tracker.sam_mask_decoder"),
    # memory attention
    (
        "memory_attention.layers.{i}.self_attn.o_proj",
        "tracker.transformer.encoder.layers.{i}.self_attn.out_proj",
    ),
    (
        "memory_attention.layers.{i}.cross_attn_image.o_proj",
        "tracker.transformer.encoder.layers.{i}.cross_attn_image.out_proj",
    ),
    *(
        (f"memory_attention.layers.{{i}}.layer_norm{n}", f"tracker.transformer.encoder.layers.{{i}}.norm{n}")
        for n in range(1, 4)
    ),
    ("memory_attention.layer_norm", "tracker.transformer.encoder.norm"),
    ("memory_attention", "tracker.transformer.encoder"),
    # memory encoder
    *(
        (
            f"memory_encoder.mask_downsampler.layers.{s}.conv",
            f"tracker.maskmem_backbone.mask_downsampler.encoder.{3 * s}",
        )
        for s in range(4)
    ),
    *(
        (
            f"memory_encoder.mask_downsampler.layers.{s}.layer_norm",
            f"tracker.maskmem_backbone.mask_downsampler.encoder.{3 * s + 1}",
        )
        for s in range(4)
    ),
    ("memory_encoder.mask_downsampler.final_conv", "tracker.maskmem_backbone.mask_downsampler.encoder.12"),
    ("memory_encoder.feature_projection", "tracker.maskmem_backbone.pix_feat_proj"),
    ("memory_encoder.memory_fuser.layers.{i}.scale", "tracker.maskmem_backbone.fuser.layers.{i}.gamma"),
    (
        "memory_encoder.memory_fuser.layers.{i}.depthwise_conv",
        "tracker.maskmem_backbone.fuser.layers.{i}.dwconv",
    ),
    ("memory_encoder.memory_fuser.layers.{i}.layer_norm", "tracker.maskmem_backbone.fuser.layers.{i}.norm"),
    (
        "memory_encoder.memory_fuser.layers.{i}.pointwise_conv1",
        "tracker.maskmem_backbone.fuser.layers.{i}.pwconv1",
    ),
    (
        "memory_encoder.memory_fuser.layers.{i}.pointwise_conv2",
        "tracker.maskmem_backbone.fuser.layers.{i}.pwconv2",
    ),
    ("memory_encoder.projection", "tracker.maskmem_backbone.out_proj"),
    # tracker neck
    (
        "vision_encoder.neck.fpn_layers.0.scale_layers.0",
        "detector.backbone.vision_backbone.sam2_convs.0.dconv_2x2_0",
    ),
    (
        "vision_encoder.neck.fpn_layers.0.scale_layers.2",
        "detector.backbone.vision_backbone.sam2_convs.0.dconv_2x2_1",
    ),
    (
        "vision_encoder.neck.fpn_layers.1.scale_layers.0",
        "detector.backbone.vision_backbone.sam2_convs.1.dconv_2x2",
    ),
    ("vision_encoder.neck.fpn_layers.{l}.proj1", "detector.backbone.vision_backbone.sam2_convs.{l}.conv_1x1"),
    ("vision_encoder.neck.fpn_layers.{l}.proj2", "detector.backbone.vision_backbone.sam2_convs.{l}.conv_3x3"),
)

# transformers keeps one (4, 256) table where sam3 has four (1, 256) embeddings.
TRANSFORMERS_POINT_EMBED = "prompt_encoder.point_embed.weight"
SAM3_POINT_EMBED = "tracker.sam_prompt_encoder.point_embeddings.{k}.weight"
# A second copy of the random-Fourier matrix inside the prompt encoder (tied to the shared one).
TRANSFORMERS_ALIASES = {
    "prompt_encoder.shared_embedding.positional_embedding": "shared_image_embedding.positional_embedding",
}


def _compile_prefix(pattern: str) -> re.Pattern[str]:
    return re.compile(_compile(pattern).pattern[:-1] + r"(?P<_rest>\..*)?$")


class PrefixRenames:
    """Bidirectional module-prefix renames; the longest matching prefix wins."""

    def __init__(self, pairs: Iterable[tuple[str, str]]):
        self.pairs = tuple(pairs)
        self._fwd = sorted(((_compile_prefix(a), b, len(a)) for a, b in self.pairs), key=lambda t: -t[2])
        self._bwd = sorted(((_compile_prefix(b), a, len(b)) for a, b in self.pairs), key=lambda t: -t[2])

    @staticmethod
    def _apply(table, key: str) -> str | None:
        for pattern, target, _ in table:
            if m := pattern.match(key):
                groups = {k: v for k, v in m.groupdict().items() if k != "_rest"}
                return target.format(**groups) + (m.group("_rest") or "")
        return None

    def forward(self, key: str) -> str | None:
        return self._apply(self._fwd, key)

    def backward(self, key: str) -> str | None:
        return self._apply(self._bwd, key)


TRANSFORMERS_TABLE = PrefixRenames(TRANSFORMERS_RENAMES)

# The trunk in transformers (`Sam3ViTModel`): under `vision_encoder.backbone.` in a saved
# `Sam3TrackerVideoModel` / `Sam3Model`, under `detector_model.vision_encoder.backbone.` in the hub's
# `facebook/sam3`. Renames are relative to those prefixes and to the sam3.pt trunk prefix. Two
# tensors also change shape: q/k/v projections are fused into `qkv` (rows q | k | v), and the position
# table has no class-token row.
TRANSFORMERS_TRUNK_PREFIXES: tuple[str, ...] = (
    "detector_model.vision_encoder.backbone.",
    "vision_encoder.backbone.",
)
TRANSFORMERS_TRUNK_TABLE = PrefixRenames(
    (
        ("embeddings.patch_embeddings.projection", "patch_embed.proj"),
        ("embeddings.position_embeddings", "pos_embed"),
        ("layer_norm", "ln_pre"),
        ("layers.{i}.layer_norm1", "blocks.{i}.norm1"),
        ("layers.{i}.layer_norm2", "blocks.{i}.norm2"),
        ("layers.{i}.attention.o_proj", "blocks.{i}.attn.proj"),
        ("layers.{i}.attention", "blocks.{i}.attn"),
        ("layers.{i}.mlp", "blocks.{i}.mlp"),
    )
)
TRANSFORMERS_TRUNK_QKV = ("q_proj", "k_proj", "v_proj")
