"""The upstream PyTorch models (the `sam3` package) with random weights, runnable on any machine.

Parity tests and the PyTorch columns of `es3 bench` build their references here. Importing this
module needs torch and sam3 (the `torch` extra); it patches the few places where upstream code
hard-codes CUDA, and only when no GPU is present. sam3's modules are imported where they are used,
once the patches are in place.
"""

from __future__ import annotations

import contextlib
import math

import torch


def _install_cpu_shims() -> None:
    """Let the upstream code run without CUDA (it hard-codes `.cuda()`, `pin_memory()` and a CUDA cache)."""
    if torch.cuda.is_available():
        return
    import sam3.model.position_encoding as pe

    if getattr(pe.PositionEmbeddingSine.__init__, "_es3_cpu", False):
        return
    original = pe.PositionEmbeddingSine.__init__

    def cpu_init(
        self, num_pos_feats, temperature=10000, normalize=True, scale=None, precompute_resolution=None
    ):
        original(
            self,
            num_pos_feats,
            temperature=temperature,
            normalize=normalize,
            scale=scale,
            precompute_resolution=None,
        )

    cpu_init._es3_cpu = True
    pe.PositionEmbeddingSine.__init__ = cpu_init
    torch.Tensor.cuda = lambda t, *a, **k: t
    torch.Tensor.pin_memory = lambda t, *a, **k: t


_install_cpu_shims()


def _is_embedding(name: str) -> bool:
    """Learned tokens and embedding tables (drawn at unit scale), as opposed to weight matrices."""
    parts = [p for p in name.removesuffix(".weight").split(".") if not p.isdigit()]
    return any(s in parts[-1] for s in ("token", "embed", "tpos_enc", "no_obj_ptr", "gaussian"))


def randomize_(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Overwrite every float parameter and buffer with fresh random values; return the state dict.

    Upstream initialisation leaves many tensors at 0 or 1 (biases, layer scales of 1e-6,
    norms), which would make parity checks blind to those parameters. Weight matrices get
    `N(0, 1/fan_in)`, learned tokens and embeddings `N(0, 1)`, norm scales `1 + N(0, 0.1)`,
    layer scales `0.5 + N(0, 0.1)`, biases `N(0, 0.1)`.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if _is_embedding(name):
                t.copy_(torch.randn(t.shape, generator=g))
            elif t.ndim >= 2:
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(max(math.prod(t.shape[1:]), 1)))
            elif "norm" in name and name.endswith("weight"):
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith("gamma"):
                t.copy_(0.5 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return module.state_dict()


def build_tracker(seed: int, *, memory_selection: bool = False) -> torch.nn.Module:
    """The upstream SAM3 tracker (no backbone) in eval mode with fresh random weights."""
    from sam3.model_builder import build_tracker as upstream_build

    tracker = upstream_build(apply_temporal_disambiguation=memory_selection, with_backbone=False)
    tracker.eval()
    randomize_(tracker, seed)
    return tracker


def build_neck(seed: int) -> torch.nn.Module:
    """The upstream tracker neck (`sam2_convs`, all 4 levels) with fresh random weights."""
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine

    class _Trunk(torch.nn.Module):
        channel_list = (1024,)

    neck = Sam3DualViTDetNeck(_Trunk(), PositionEmbeddingSine(256), d_model=256, add_sam2_neck=True)
    neck.eval()
    randomize_(neck, seed)
    return neck


SAM3_GLOBAL_BLOCKS = (7, 15, 23, 31)


def vit_trunk(
    *,
    depth: int = 32,
    img_size: int = 1008,
    global_blocks: tuple[int, ...] | None = None,
    window_size: int = 24,
    embed_dim: int = 1024,
    num_heads: int = 16,
    mlp_dim: int = 4736,
    pretrain_img_size: int = 336,
) -> torch.nn.Module:
    """The upstream SAM3 ViT trunk with `_create_vit_backbone`'s settings at any geometry (untrained).

    The global blocks default to SAM3's that lie below `depth`, or the last block when none does
    (upstream's output is the last global block's).
    """
    from sam3.model.vitdet import ViT

    if global_blocks is None:
        global_blocks = tuple(i for i in SAM3_GLOBAL_BLOCKS if i < depth) or (depth - 1,)
    trunk = ViT(
        img_size=img_size,
        pretrain_img_size=pretrain_img_size,
        patch_size=14,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_dim / embed_dim,
        norm_layer="LayerNorm",
        drop_path_rate=0.1,
        qkv_bias=True,
        use_abs_pos=True,
        tile_abs_pos=True,
        global_att_blocks=global_blocks,
        rel_pos_blocks=(),
        use_rope=True,
        use_interp_rope=True,
        window_size=window_size,
        pretrain_use_cls_token=True,
        retain_cls_token=False,
        ln_pre=True,
        ln_post=False,
        return_interm_layers=False,
        bias_patch_embed=False,
    )
    if trunk.blocks[0].mlp.fc1.out_features != mlp_dim:
        raise ValueError(f"mlp_dim {mlp_dim} is not reachable as int(embed_dim * ratio) upstream")
    return trunk.eval()


def build_trunk(seed: int, *, depth: int | None = None, **geometry) -> torch.nn.Module:
    """`vit_trunk` in eval mode with fresh random weights; `depth` None = all 32 blocks."""
    trunk = vit_trunk(depth=32 if depth is None else depth, **geometry)
    randomize_(trunk, seed)
    return trunk


def tracker_predictor(
    *,
    image_size: int = 1008,
    memory_selection: bool = False,
    backbone: torch.nn.Module | None = None,
    predictor_class: type | None = None,
    **settings,
) -> torch.nn.Module:
    """The upstream `Sam3TrackerPredictor` (or a subclass) as `build_tracker` configures it, at any
    input size, untrained, in eval mode.

    Only the geometry changes with `image_size` (grid = image_size / 14; the memory encoder's mask
    size is 16 × grid, as 1152 is for 72): the parameters and their shapes are SAM3's, so the
    model reads a sam3.pt layout. `settings` override `build_tracker`'s keyword arguments
    (e.g. `num_maskmem`, `max_cond_frames_in_attn`).
    """
    from sam3.model.sam3_tracking_predictor import Sam3TrackerPredictor
    from sam3.model_builder import _create_tracker_maskmem_backbone, _create_tracker_transformer

    maskmem = _create_tracker_maskmem_backbone()
    mask_size = image_size // 14 * 16
    maskmem.mask_downsampler.interpol_size = [mask_size, mask_size]
    kwargs = dict(
        image_size=image_size,
        num_maskmem=7,
        backbone=backbone,
        backbone_stride=14,
        transformer=_create_tracker_transformer(),
        maskmem_backbone=maskmem,
        multimask_output_in_sam=True,
        forward_backbone_per_frame_for_eval=True,
        trim_past_non_cond_mem_for_eval=False,
        multimask_output_for_tracking=True,
        multimask_min_pt_num=0,
        multimask_max_pt_num=1,
        always_start_from_first_ann_frame=False,
        non_overlap_masks_for_mem_enc=False,
        non_overlap_masks_for_output=False,
        max_cond_frames_in_attn=4,
        offload_output_to_cpu_for_eval=False,
        sam_mask_decoder_extra_args={
            "dynamic_multimask_via_stability": True,
            "dynamic_multimask_stability_delta": 0.05,
            "dynamic_multimask_stability_thresh": 0.98,
        },
        clear_non_cond_mem_around_input=True,
        fill_hole_area=0,
        use_memory_selection=memory_selection,
    )
    kwargs.update(settings)
    return (predictor_class or Sam3TrackerPredictor)(**kwargs).eval()


def build_tracker_predictor(seed: int, *, image_size: int = 1008, memory_selection: bool = False):
    """`tracker_predictor` with every weight drawn fresh from `seed`."""
    model = tracker_predictor(image_size=image_size, memory_selection=memory_selection)
    randomize_(model, seed)
    return model


def tracker_features(tracker: torch.nn.Module, neck: torch.nn.Module, trunk_features) -> dict:
    """Upstream cached backbone outputs `{frame: (image, backbone_out)}` from trunk features `[T, g, g, C]`.

    Levels 0-2 of `sam2_convs` with their sine PEs, levels 0/1 projected by the decoder's
    `conv_s0`/`conv_s1` as `Sam3TrackerBase.forward_image` does.
    """
    cached = {}
    with torch.no_grad():
        for t in range(trunk_features.shape[0]):
            x = torch.as_tensor(trunk_features[t : t + 1]).float().permute(0, 3, 1, 2)
            levels = [neck.sam2_convs[i](x) for i in range(3)]
            pos = [neck.position_encoding(level).to(level.dtype) for level in levels]
            levels[0] = tracker.sam_mask_decoder.conv_s0(levels[0])
            levels[1] = tracker.sam_mask_decoder.conv_s1(levels[1])
            cached[t] = (torch.zeros(1, 3, 1, 1), {"backbone_fpn": levels, "vision_pos_enc": pos})
    return cached


def init_tracking(
    tracker: torch.nn.Module, neck: torch.nn.Module, trunk_features, video_size: tuple[int, int]
):
    """An upstream inference state over trunk features `[T, g, g, C]` (outputs at `video_size`)."""
    with torch.inference_mode():
        return tracker.init_state(
            video_height=video_size[0],
            video_width=video_size[1],
            num_frames=trunk_features.shape[0],
            cached_features=tracker_features(tracker, neck, trunk_features),
            offload_video_to_cpu=True,
            offload_state_to_cpu=True,
        )


def propagate(
    tracker: torch.nn.Module, state, *, start_frame_idx: int | None = None, reverse: bool = False
) -> list:
    """One upstream `propagate_in_video` (with its preflight) -> `[(frame_idx, obj_ids, logits [O, H, W])]`
    in processing order, logits at video resolution (float32 numpy)."""
    results = []
    with torch.inference_mode():
        for frame_idx, obj_ids, _, video_res, _ in tracker.propagate_in_video(
            state,
            start_frame_idx=start_frame_idx,
            max_frame_num_to_track=None,
            reverse=reverse,
            tqdm_disable=True,
            propagate_preflight=True,
        ):
            results.append((frame_idx, list(obj_ids), video_res[:, 0].float().numpy().copy()))
    return results


def track_with_masks(
    tracker: torch.nn.Module,
    neck: torch.nn.Module,
    trunk_features,
    video_size: tuple[int, int],
    masks: dict,
    *,
    start_frame_idx: int | None = None,
    reverse: bool = False,
) -> list:
    """Run the upstream predictor on trunk features `[T, g, g, C]` with mask prompts.

    masks: `{obj_id: (frame_idx, mask [H, W] bool)}`. Returns `propagate`'s list.
    """
    state = init_tracking(tracker, neck, trunk_features, video_size)
    with torch.inference_mode():
        for obj_id, (frame_idx, mask) in masks.items():
            tracker.add_new_mask(state, frame_idx, obj_id, torch.as_tensor(mask))
    return propagate(tracker, state, start_frame_idx=start_frame_idx, reverse=reverse)


def trunk_call(trunk: torch.nn.Module, batch: int, image_size: int):
    """A no-argument call that runs `trunk` on a fixed random batch and returns when it is done.

    On CUDA under bfloat16 autocast, as SAM3's predictor runs; float32 on CPU. Returns
    `(call, device, dtype description)` for the benchmarks.
    """
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    trunk = trunk.to(device)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def call():
        with torch.inference_mode(), autocast:
            out = trunk(images)
        if cuda:
            torch.cuda.synchronize()
        return out

    return call, device, "bfloat16 autocast" if cuda else "float32"
