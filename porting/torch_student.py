"""PyTorch twins of the student memory path, with the key names the export writes.

`TorchStudentMemory` computes what `es3_jax.memory.path.MemoryPath` computes (same
config, same inputs in the batch-first token layout) and its `state_dict()` has the export's
keys without the `tracker.` prefix: `spatial_perceiver.*` (EdgeTAM's names) and
`transformer.encoder.*` (the SAM3 teacher's memory-attention names; with 4 layers, no perceiver
and no pooling, upstream's `tracker.transformer.encoder` weights load into it unchanged).

The code is written independently of the JAX modules (complex-number RoPE, `avg_pool2d`
pooling, `unfold` windows) so that the parity tests compare two implementations. Parameters move
between the two through `porting.keymap.STUDENT_TABLE` (`porting.sam3_checkpoint.port_student`
and `student_to_torch`).

`load_efficient_sam3` builds upstream sam3's tracker predictor around the twin from a merged
export (`es3 export`), so PyTorch users track with the student as they track with SAM3;
`save_efficient_sam3` writes such a model back as a merged file (`es3 port` reads it).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from es3_jax.config import SAM3_VIT, Config
from es3_jax.params import check_shapes
from porting.checkpoint_contents import read_contents
from porting.checkpoint_file import CheckpointError, read_checkpoint, record_config, write_checkpoint

EXPORT_PREFIX = "tracker."


def sine_grid(height: int, width: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The normalised DETR sine encoding `[H·W, dim]` (y channels, then x), row-major tokens."""
    half = dim // 2
    scale = 2 * math.pi
    ys = torch.arange(1, height + 1, dtype=torch.float32) / (height + 1e-6) * scale
    xs = torch.arange(1, width + 1, dtype=torch.float32) / (width + 1e-6) * scale
    dim_t = temperature ** (2 * torch.div(torch.arange(half), 2, rounding_mode="floor") / half)

    def block(p: torch.Tensor) -> torch.Tensor:
        p = p[:, None] / dim_t
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    y = block(ys)[:, None, :].expand(height, width, half)
    x = block(xs)[None, :, :].expand(height, width, half)
    return torch.cat([y, x], dim=-1).reshape(height * width, dim)


# --- Perceiver (EdgeTAM layout) --------------------------------------------------------------


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class _PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, *, cross: bool):
        super().__init__()
        self.heads = heads
        if cross:
            self.norm_x = nn.LayerNorm(dim)
            self.norm_latents = nn.LayerNorm(dim)
        else:
            self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(
        self, latents: torch.Tensor, x: torch.Tensor | None = None, pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x is None:
            latents = x = self.norm(latents)
        else:
            latents, x = self.norm_latents(latents), self.norm_x(x)
        k, v = self.to_kv(x).chunk(2, dim=-1)
        if pos is not None:
            k, v = k + pos, v + pos
        q = self.to_q(latents)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.to_out(out.transpose(1, 2).flatten(2))


class _PerceiverLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ff_mult: int):
        super().__init__()
        self.attn = _PerceiverAttention(dim, heads, cross=True)
        self.ff = _feed_forward(dim, ff_mult)
        self.self_attn = _PerceiverAttention(dim, heads, cross=False)
        self.self_ff = _feed_forward(dim, ff_mult)

    def forward(self, latents: torch.Tensor, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        latents = latents + self.attn(latents, x, pos)
        latents = latents + self.ff(latents)
        latents = latents + self.self_attn(latents)
        return latents + self.self_ff(latents)


class TorchPerceiverResampler(nn.Module):
    """EdgeTAM's spatial perceiver (global + windowed 2-D latents), batch-safe, any memory size."""

    def __init__(
        self,
        dim: int = 64,
        num_latents: int = 256,
        num_latents_2d: int = 256,
        depth: int = 2,
        heads: int = 1,
        ff_mult: int = 4,
        window_size: int = 4,
    ):
        super().__init__()
        self.grid = math.isqrt(num_latents_2d)
        self.window_size = window_size
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.latents_2d = nn.Parameter(torch.randn(num_latents_2d, dim))
        self.layers = nn.ModuleList([_PerceiverLayer(dim, heads, ff_mult) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features, pos `[B, D, H, W]` -> tokens, positions `[B, num_latents + g², D]`."""
        b, d = features.shape[:2]
        x = features.flatten(2).transpose(1, 2)
        latents = self.latents.unsqueeze(0).repeat(b, 1, 1)
        for layer in self.layers:
            latents = layer(latents, x, pos.flatten(2).transpose(1, 2))
        latents = self.norm(latents)

        g, s = self.grid, self.window_size
        if features.shape[-2:] != (g * s, g * s):
            features = F.interpolate(features, size=(g * s, g * s), mode="bilinear", align_corners=False)
        # [B, D, g, g, s, s] -> one row of s² window tokens per latent, row-major windows.
        windows = (
            features.unfold(2, s, s).unfold(3, s, s).permute(0, 2, 3, 4, 5, 1).reshape(b * g * g, s * s, d)
        )
        latents_2d = self.latents_2d.unsqueeze(0).repeat(b, 1, 1).reshape(b * g * g, 1, d)
        for layer in self.layers:
            latents_2d = layer(latents_2d, windows, None)
        latents_2d = self.norm(latents_2d.reshape(b, g * g, d))

        tokens = torch.cat([latents, latents_2d], dim=1)
        tokens_pos = torch.cat(
            [torch.zeros_like(latents), sine_grid(g, g, d).to(tokens).unsqueeze(0).repeat(b, 1, 1)], dim=1
        )
        return tokens, tokens_pos


# --- Memory attention (SAM3 teacher layout) -------------------------------------------------


def rope_angles(xs: torch.Tensor, ys: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Axial angles `[N, head_dim/2]`: x frequencies, then y frequencies."""
    freqs = 1.0 / (
        theta ** (torch.arange(0, head_dim, 4, device=xs.device)[: head_dim // 4].float() / head_dim)
    )
    return torch.cat([torch.outer(xs, freqs), torch.outer(ys, freqs)], dim=-1)


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of `x [B, H, N, Dh]` as complex numbers by `angles [N, Dh/2]`."""
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2).type_as(x)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim, dim)
        self.v_proj = nn.Linear(kv_dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_angles: torch.Tensor,
        k_angles: torch.Tensor,
        pool=None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = _rotate(self._heads(self.q_proj(q)), q_angles)
        k = _rotate(self._heads(self.k_proj(k)), k_angles)
        v = self._heads(self.v_proj(v))
        bias = None
        if pool is not None:
            k, v, bias, mask = pool(k, v, mask)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if bias is not None:
            logits = logits + bias
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = logits.softmax(dim=-1) @ v
        return self.out_proj(out.transpose(1, 2).flatten(2))


class _MemoryAttentionLayer(nn.Module):
    def __init__(self, dim: int, kv_dim: int, ffn_dim: int, heads: int):
        super().__init__()
        self.self_attn = _Attention(dim, heads, dim)
        self.cross_attn_image = _Attention(dim, heads, kv_dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, memory, memory_pos, q_angles, k_angles, pool, mask) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h, q_angles, q_angles)
        h = self.norm2(x)
        x = x + self.cross_attn_image(h, memory + memory_pos, memory, q_angles, k_angles, pool, mask)
        return x + self.linear2(F.relu(self.linear1(self.norm3(x))))


class TorchMemoryAttention(nn.Module):
    """SAM3's memory-attention stack (pre-norm, RoPE, ReLU FFN) with any number of layers."""

    def __init__(
        self,
        num_layers: int = 4,
        dim: int = 256,
        kv_dim: int = 64,
        ffn_dim: int = 2048,
        heads: int = 1,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        self.head_dim = dim // heads
        self.rope_theta = rope_theta
        self.layers = nn.ModuleList(
            [_MemoryAttentionLayer(dim, kv_dim, ffn_dim, heads) for _ in range(num_layers)]
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, src, src_pos, memory, memory_pos, query_grid, k_angles, pool=None, mask=None):
        """src, src_pos `[B, Nq, D]`; memory, memory_pos `[B, Nk, Dkv]` -> `[B, Nq, D]`."""
        qh, qw = query_grid
        n = torch.arange(qh * qw, device=src.device)
        q_angles = rope_angles((n % qw).float(), (n // qw).float(), self.head_dim, self.rope_theta)
        x = src + 0.1 * src_pos
        for layer in self.layers:
            x = layer(x, memory, memory_pos, q_angles, k_angles, pool, mask)
        return self.norm(x)


# --- The student memory path ----------------------------------------------------------------


class _Transformer(nn.Module):
    """Holds the memory attention as `.encoder`, so its keys are `transformer.encoder.*` as in sam3."""

    def __init__(self, encoder: TorchMemoryAttention):
        super().__init__()
        self.encoder = encoder


class TorchStudentMemory(nn.Module):
    """The PyTorch twin of `MemoryPath`: `compress` one memory frame, `forward` to condition a frame."""

    def __init__(
        self,
        memory_attention: TorchMemoryAttention,
        spatial_perceiver: TorchPerceiverResampler | None = None,
        pool_size: int = 1,
    ):
        super().__init__()
        self.spatial_perceiver = spatial_perceiver
        self.transformer = _Transformer(memory_attention)
        self.pool_size = pool_size

    def compress(self, features: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features, pos `[B, Cm, H, W]` -> tokens, positions `[B, N, Cm]`."""
        if self.spatial_perceiver is not None:
            return self.spatial_perceiver(features, pos)
        return features.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2)

    def _frame_layout(self, query_grid, device=None):
        """(global tokens per frame, (gh, gw) grid tokens, their (x, y) positions in the query frame)."""
        qh, qw = query_grid
        if self.spatial_perceiver is None:
            gh, gw, n_global = qh, qw, 0
            cx, cy = torch.arange(qw, device=device).float(), torch.arange(qh, device=device).float()
        else:
            g = self.spatial_perceiver.grid
            gh = gw = g
            n_global = self.spatial_perceiver.latents.shape[0]
            cx = (torch.arange(g, device=device).float() + 0.5) * (qw / g) - 0.5
            cy = (torch.arange(g, device=device).float() + 0.5) * (qh / g) - 0.5
        xs = cx.repeat(gh)
        ys = cy.repeat_interleave(gw)
        return n_global, (gh, gw), xs, ys

    def tokens_per_frame(self, query_grid: tuple[int, int]) -> int:
        """Tokens `compress` makes of one memory frame on `query_grid`."""
        n_global, (gh, gw), _, _ = self._frame_layout(query_grid)
        return n_global + gh * gw

    def forward(
        self,
        src,
        src_pos,
        query_grid,
        frames,
        frames_pos,
        frame_valid,
        pointers,
        pointers_pos,
        pointer_valid,
    ) -> torch.Tensor:
        """Same arguments and layout as `MemoryPath.__call__` -> `[B, Nq, C]`."""
        encoder = self.transformer.encoder
        _, s, n, _ = frames.shape
        n_global, (gh, gw), xs, ys = self._frame_layout(query_grid, src.device)
        grid_angles = rope_angles(xs, ys, encoder.head_dim, encoder.rope_theta)
        half = encoder.head_dim // 2
        frame_angles = torch.cat([grid_angles.new_zeros(n_global, half), grid_angles])
        k_angles = torch.cat([frame_angles.repeat(s, 1), grid_angles.new_zeros(pointers.shape[1], half)])
        memory = torch.cat([frames.flatten(1, 2), pointers], dim=1)
        memory_pos = torch.cat([frames_pos.flatten(1, 2), pointers_pos], dim=1)
        mask = torch.cat([frame_valid.bool().repeat_interleave(n, dim=1), pointer_valid.bool()], dim=1)
        pool = None
        if self.pool_size > 1:
            pool = _Pooling(s, n_global, (gh, gw), self.pool_size)
        return encoder(src, src_pos, memory, memory_pos, query_grid, k_angles, pool, mask)


class _Pooling:
    """Eq. 5: per frame, `avg_pool2d` the grid tokens of projected, rotated k and v; +log(p²) logits."""

    def __init__(self, num_frames: int, n_global: int, grid: tuple[int, int], pool: int):
        self.num_frames, self.n_global, self.grid, self.pool = num_frames, n_global, grid, pool

    def __call__(self, k, v, mask):
        gh, gw = self.grid
        p, s, n_global = self.pool, self.num_frames, self.n_global
        per_frame = n_global + gh * gw
        spatial = s * per_frame

        def pool_tokens(t: torch.Tensor) -> torch.Tensor:
            b, h = t.shape[:2]
            frames = t[:, :, :spatial].reshape(b, h, s, per_frame, t.shape[-1])
            grid = frames[:, :, :, n_global:].reshape(b * h * s, gh, gw, -1).permute(0, 3, 1, 2)
            pooled = F.avg_pool2d(grid, p).flatten(2).transpose(1, 2).reshape(b, h, s, -1, t.shape[-1])
            out = torch.cat([frames[:, :, :, :n_global], pooled], dim=3).flatten(2, 3)
            return torch.cat([out, t[:, :, spatial:]], dim=2)

        pooled_per_frame = (gh // p) * (gw // p)
        bias = k.new_zeros(s, n_global + pooled_per_frame, dtype=torch.float32)
        bias[:, n_global:] = math.log(p * p)
        bias = torch.cat([bias.flatten(), bias.new_zeros(k.shape[2] - spatial)])
        # A pooled token is valid when all of its cell is: pool the mask as 0/1 and keep exact ones.
        m = pool_tokens(mask[:, None, :, None].float())[:, 0, :, 0] == 1.0
        return pool_tokens(k), pool_tokens(v), bias, m


def torch_student_from_config(cfg: Config) -> TorchStudentMemory:
    """The twin of `student_from_config(cfg)` (fresh PyTorch-initialised weights)."""
    t, pc, mc = cfg.MODEL.TEACHER, cfg.MODEL.PERCEIVER, cfg.MODEL.MEMORY_ATTENTION
    attention = TorchMemoryAttention(
        mc.NUM_LAYERS,
        t.D_MODEL,
        t.MEM_DIM,
        t.MEMORY_ATTENTION_FFN_DIM,
        t.MEMORY_ATTENTION_HEADS,
        t.ROPE_THETA,
    )
    perceiver = None
    if pc.ENABLED:
        perceiver = TorchPerceiverResampler(
            t.MEM_DIM, pc.NUM_LATENTS, pc.NUM_LATENTS_2D, pc.DEPTH, pc.HEADS, pc.FF_MULT, pc.WINDOW_SIZE
        )
    return TorchStudentMemory(attention, perceiver, mc.POOL_SIZE).eval()


def twin_state_dict(twin: TorchStudentMemory) -> dict[str, torch.Tensor]:
    """The twin's weights under the export's keys (`tracker.` + its own state-dict keys)."""
    return {EXPORT_PREFIX + k: v.detach().clone() for k, v in twin.state_dict().items()}


# --- The upstream tracker predictor with the student's memory path ---------------------------


class StudentEncoder(nn.Module):
    """Answers upstream's `transformer.encoder(...)` call with the student's memory attention.

    Upstream `_prepare_memory_conditioned_features` selects the memory frames (conditioning frames,
    recent frames or memory selection), adds their temporal encodings, appends the object-pointer
    tokens and concatenates everything along the sequence. Each stored frame is what the student's
    `compress` made of it (see `EfficientSam3Predictor._encode_new_memory`), so the sequence splits
    back into `[B, S, N, Cm]` frames plus pointers: exactly `TorchStudentMemory.forward`'s inputs.
    Its parameters are `layers.*` / `norm`, the keys of the memory attention it replaces.
    """

    def __init__(self, student: TorchStudentMemory):
        super().__init__()
        encoder = student.transformer.encoder
        self.layers, self.norm = encoder.layers, encoder.norm
        # A plain attribute, not a submodule: its modules are registered here and on the predictor.
        self.__dict__["student"] = student

    def forward(
        self,
        src,
        src_key_padding_mask,
        src_pos,
        prompt,
        prompt_pos,
        prompt_key_padding_mask,
        feat_sizes,
        num_obj_ptr_tokens: int,
    ) -> dict[str, torch.Tensor]:
        """Upstream's arguments (sequence-first `[L, B, C]`) -> `{"memory": [H·W, B, C]}`."""
        del src_key_padding_mask, prompt_key_padding_mask  # upstream passes no padding
        if isinstance(src, list):
            src, src_pos = src[-1], src_pos[-1]
        query_grid = tuple(feat_sizes[-1])
        b, c = prompt.shape[1], prompt.shape[2]
        n = self.student.tokens_per_frame(query_grid)
        spatial = prompt.shape[0] - num_obj_ptr_tokens
        if spatial % n:
            raise ValueError(f"{spatial} memory tokens are not whole frames of {n} student tokens")
        s = spatial // n
        memory = prompt.transpose(0, 1).float()
        memory_pos = prompt_pos.transpose(0, 1).float()
        out = self.student(
            src.transpose(0, 1),
            src_pos.transpose(0, 1),
            query_grid,
            memory[:, :spatial].reshape(b, s, n, c),
            memory_pos[:, :spatial].reshape(b, s, n, c),
            torch.ones(b, s, dtype=torch.bool, device=prompt.device),
            memory[:, spatial:],
            memory_pos[:, spatial:],
            torch.ones(b, num_obj_ptr_tokens, dtype=torch.bool, device=prompt.device),
        )
        return {"memory": out.transpose(0, 1)}


def _predictor_class():
    """`EfficientSam3Predictor`, defined on first use so that this module imports without sam3."""
    global _PREDICTOR_CLASS
    if _PREDICTOR_CLASS is not None:
        return _PREDICTOR_CLASS
    from sam3.model.sam3_tracking_predictor import Sam3TrackerPredictor

    class EfficientSam3Predictor(Sam3TrackerPredictor):
        """Upstream's `Sam3TrackerPredictor` whose memory path is the student's.

        Every memory frame is compressed as soon as the memory encoder makes it, and stored as
        `[B, Cm, N, 1]`: the layout upstream keeps memory maps in, so its bookkeeping (bf16
        storage, one cached positional map, per-object slicing, frame selection, temporal and
        pointer encodings) applies unchanged to the student's tokens. The student's keys are
        `spatial_perceiver.*` and `transformer.encoder.*`.
        """

        def __init__(self, student: TorchStudentMemory | None, **kwargs):
            super().__init__(**kwargs)
            self.spatial_perceiver = None if student is None else student.spatial_perceiver
            self.__dict__["student_memory"] = student
            if student is not None:
                self.transformer.encoder = StudentEncoder(student)

        def init_state(self, *args, **kwargs):
            if self.device.type == "cpu":
                # Upstream otherwise keeps the frames and the state on "cuda".
                kwargs["offload_video_to_cpu"] = kwargs["offload_state_to_cpu"] = True
            return super().init_state(*args, **kwargs)

        def _encode_new_memory(self, *args, **kwargs):
            features, pos = super()._encode_new_memory(*args, **kwargs)
            if self.student_memory is None:
                return features, pos
            tokens, tokens_pos = self.student_memory.compress(features, pos[-1])
            return tokens.transpose(1, 2).unsqueeze(-1), [tokens_pos.transpose(1, 2).unsqueeze(-1)]

    _PREDICTOR_CLASS = EfficientSam3Predictor
    return _PREDICTOR_CLASS


_PREDICTOR_CLASS = None
BACKBONE_PREFIX = "detector.backbone.vision_backbone."


def sam3_backbone(cfg: Config) -> nn.Module:
    """SAM3's vision backbone (ViT trunk + dual neck) at the recorded geometry, as `build_tracker`'s."""
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.vl_combiner import SAM3VLBackbone

    from porting.upstream import vit_trunk  # imports sam3

    t, tr = cfg.MODEL.TEACHER, cfg.MODEL.TRUNK
    trunk = vit_trunk(
        depth=tr.DEPTH,
        img_size=t.IMAGE_SIZE,
        global_blocks=tr.GLOBAL_BLOCKS,
        window_size=tr.WINDOW_SIZE,
        embed_dim=tr.WIDTH,
        num_heads=tr.NUM_HEADS,
        mlp_dim=tr.MLP_DIM,
        pretrain_img_size=tr.PRETRAIN_IMAGE_SIZE,
    )
    neck = Sam3DualViTDetNeck(
        trunk=trunk,
        position_encoding=PositionEmbeddingSine(256, normalize=True, precompute_resolution=t.IMAGE_SIZE),
        d_model=t.D_MODEL,
        scale_factors=[4.0, 2.0, 1.0, 0.5],
        add_sam2_neck=True,
    )
    return SAM3VLBackbone(visual=neck, text=None, scalp=1)


def load_efficient_sam3(path, *, backbone: bool | None = None, device: str | torch.device | None = None):
    """The tracker of a merged export (`es3 export`) as an upstream sam3 video predictor.

    Returns a `Sam3TrackerPredictor` subclass (`init_state`, `add_new_mask`,
    `add_new_points_or_box`, `propagate_in_video`, `reset_state`, ...) whose memory path is the
    student recorded in the file. backbone: build SAM3's vision backbone from the file's
    `detector.backbone.vision_backbone.*` keys so that `init_state(video_path=...)` works (None:
    when the file holds SAM3's ViT trunk; a stage-1 trunk is not sam3 code, so then pass
    `cached_features` to `init_state` or set `predictor.backbone` yourself). Loading is strict:
    every `tracker.*` key (and backbone key) must be one the model has, with its shape, and the
    model must find all of its keys; otherwise the error names each key.
    """
    from porting.upstream import tracker_predictor  # imports sam3

    contents = read_contents(path)
    sd, record = contents.state_dict, contents.record
    if record is None:
        raise CheckpointError(
            f"{path}: no es3_config record: not a merged export (write one with `es3 export`)"
        )
    cfg = record_config(record)
    t = cfg.MODEL.TEACHER
    if backbone is None:
        backbone = contents.trunk_kind == SAM3_VIT
    student = torch_student_from_config(cfg) if record.get("memory", "student") == "student" else None
    model = tracker_predictor(
        image_size=t.IMAGE_SIZE,
        memory_selection=t.USE_MEMORY_SELECTION,
        backbone=sam3_backbone(cfg) if backbone else None,
        predictor_class=_predictor_class(),
        student=student,
        num_maskmem=t.NUM_MASKMEM,
        max_cond_frames_in_attn=t.MAX_COND_FRAMES_IN_ATTN,
        max_obj_ptrs_in_encoder=t.MAX_OBJ_PTRS_IN_ENCODER,
        mf_threshold=t.MF_THRESHOLD,
    )
    namespaces = ("tracker.", BACKBONE_PREFIX) if backbone else ("tracker.",)
    source = {_model_key(k): v for k, v in sd.items() if k.startswith(namespaces)}
    check_shapes(
        {k: tuple(v.shape) for k, v in source.items()},
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
        f"{path}: does not match the tracker its record describes",
        _file_key,
    )
    model.load_state_dict(source, strict=True)
    model.es3_record, model.es3_source = record, str(path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()


def _model_key(file_key: str) -> str:
    if file_key.startswith(BACKBONE_PREFIX):
        return "backbone.vision_backbone." + file_key.removeprefix(BACKBONE_PREFIX)
    return file_key.removeprefix("tracker.")


def _file_key(model_key: str) -> str:
    if model_key.startswith("backbone.vision_backbone."):
        return BACKBONE_PREFIX + model_key.removeprefix("backbone.vision_backbone.")
    return "tracker." + model_key


def save_efficient_sam3(model, path, *, base=None, fmt: str = "auto"):
    """Write a `load_efficient_sam3` model (e.g. after training or editing it in PyTorch) as a merged
    file: the merged file it was loaded from (or `base`) with every tensor the model holds replaced
    by the model's, and its record. `es3 port` and `VideoPredictor.from_checkpoint` read it back."""
    path = Path(path)
    if fmt == "auto":
        fmt = "safetensors" if path.suffix == ".safetensors" else "pt"
    sd, _ = read_checkpoint(base if base is not None else model.es3_source)
    sd.update({_file_key(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    return write_checkpoint(path, sd, model.es3_record, fmt)
