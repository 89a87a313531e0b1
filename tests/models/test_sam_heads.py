"""Parity of the SAM heads (prompt encoder, mask decoder, `_forward_sam_heads`, `_use_mask_as_output`,
object-pointer projection and temporal encoding) with upstream sam3's tracker, at the tracker's
full 1008 px / 72×72 geometry (upstream's `_forward_sam_heads` asserts it), plus a prompt
encoder rebuilt upstream at a reduced 224 px / 16×16 geometry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from es3_jax import weights
from es3_jax.models.sam_heads import PromptEncoder
from es3_jax.models.tracker import build_tracker
from es3_jax.params import bind
from tests import upstream

torch = upstream.torch

pytestmark = pytest.mark.parity

IMAGE, GRID = 1008, 72
TOL = 1e-5


class Heads:
    """Our tracker, its weights taken from the upstream tracker through a sam3.pt and the production
    loader (`es3_jax.weights.load`)."""

    def __init__(self, tracker, path, seed: int):
        neck = upstream.build_neck(seed)
        upstream.save_sam3_checkpoint(path, upstream.sam3_checkpoint_dict(tracker, neck))
        loaded = weights.load(path)
        self.tracker = build_tracker(loaded.cfg.MODEL.TEACHER, loaded.tracker)
        self.prompt_encoder = self.tracker.prompt_encoder
        self.mask_decoder = self.tracker.mask_decoder
        self.params = loaded.tracker


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    seed = upstream.fresh_seed()
    tracker = upstream.build_tracker(seed)
    return seed, tracker, Heads(tracker, tmp_path_factory.mktemp("sam_heads") / "sam3.pt", seed)


def _gen(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 7919 + salt)


def _j(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(upstream.to_numpy(t) if t.is_floating_point() else t.numpy())


def _nhwc(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(upstream.nchw_to_nhwc(t))


def _points(g: torch.Generator, batch: int, labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.rand(batch, len(labels), 2, generator=g) * IMAGE
    return coords, torch.tensor(labels, dtype=torch.int32).expand(batch, -1).contiguous()


def _frame(g: torch.Generator, batch: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A memory-conditioned feature and projected high-res features, as `_forward_sam_heads` takes them."""
    feat = torch.randn(batch, 256, GRID, GRID, generator=g)
    high_res = [
        torch.randn(batch, 32, 4 * GRID, 4 * GRID, generator=g),
        torch.randn(batch, 64, 2 * GRID, 2 * GRID, generator=g),
    ]
    return feat, high_res


def _check_prompts(name, ours_pe, ref_pe, points=None, boxes=None, masks=None):
    with torch.no_grad():
        ref_sparse, ref_dense = ref_pe(points=points, boxes=boxes, masks=masks)
    sparse, dense = ours_pe(
        points=None if points is None else (_j(points[0]), _j(points[1])),
        boxes=None if boxes is None else _j(boxes),
        masks=None if masks is None else _nhwc(masks),
    )
    if ref_sparse.numel():
        upstream.report(f"prompt encoder {name}: sparse", sparse, upstream.to_numpy(ref_sparse), TOL)
    else:
        assert sparse.shape == tuple(ref_sparse.shape)
    upstream.report(f"prompt encoder {name}: dense", dense, upstream.nchw_to_nhwc(ref_dense), TOL)


def test_prompt_encoder(setup):
    seed, tracker, heads = setup
    ref_pe, pe = tracker.sam_prompt_encoder, heads.prompt_encoder
    g = _gen(seed, 1)
    upstream.report(
        "prompt encoder dense PE", pe.dense_pe(), upstream.nchw_to_nhwc(ref_pe.get_dense_pe()), TOL
    )

    coords, labels = _points(g, 2, [1, 0, -1, 2, 3, 1])
    _check_prompts("points (labels -1..3)", pe, ref_pe, points=(coords, labels))
    box = torch.sort(torch.rand(2, 2, 2, generator=g) * IMAGE, dim=1).values  # [B, corner, xy]
    _check_prompts(
        "box as points 2/3", pe, ref_pe, points=(box, torch.tensor([[2, 3]] * 2, dtype=torch.int32))
    )
    _check_prompts("boxes", pe, ref_pe, boxes=box.reshape(2, 4))
    _check_prompts("points and boxes", pe, ref_pe, points=(coords, labels), boxes=box.reshape(2, 4))
    mask = torch.randn(2, 1, 4 * GRID, 4 * GRID, generator=g) * 5
    _check_prompts("mask", pe, ref_pe, points=(coords[:, :2], labels[:, :2]), masks=mask)
    _check_prompts("nothing", pe, ref_pe)


def test_prompt_encoder_reduced_geometry(setup):
    from sam3.sam.prompt_encoder import PromptEncoder as RefPromptEncoder

    seed, tracker, heads = setup
    image, grid = 224, 16
    ref_pe = RefPromptEncoder(256, (grid, grid), (image, image), 16).eval()
    ref_pe.load_state_dict(tracker.sam_prompt_encoder.state_dict())
    pe = bind(lambda: PromptEncoder(256, image, grid, rngs=nnx.Rngs(0)), heads.params["prompt_encoder"])
    g = _gen(seed, 2)
    upstream.report(
        "prompt encoder 16² dense PE", pe.dense_pe(), upstream.nchw_to_nhwc(ref_pe.get_dense_pe()), TOL
    )
    points = (torch.rand(3, 2, 2, generator=g) * image, torch.tensor([[1, 0]] * 3, dtype=torch.int32))
    _check_prompts("16² points", pe, ref_pe, points=points)
    _check_prompts("16² mask", pe, ref_pe, masks=torch.randn(3, 1, 4 * grid, 4 * grid, generator=g))


def test_high_res_projection(setup):
    seed, tracker, heads = setup
    g = _gen(seed, 3)
    # 1×1 convs: any spatial size checks them.
    s0, s1 = torch.randn(2, 256, 24, 24, generator=g), torch.randn(2, 256, 12, 12, generator=g)
    dec = tracker.sam_mask_decoder
    with torch.no_grad():
        ref0, ref1 = dec.conv_s0(s0), dec.conv_s1(s1)
    ours0, ours1 = heads.mask_decoder.project_high_res(_nhwc(s0), _nhwc(s1))
    upstream.report("conv_s0", ours0, upstream.nchw_to_nhwc(ref0), TOL)
    upstream.report("conv_s1", ours1, upstream.nchw_to_nhwc(ref1), TOL)


def _decoder_inputs(seed: int, tracker):
    g = _gen(seed, 4)
    feat, high_res = _frame(g, 2)
    coords, labels = _points(g, 2, [1, 0])
    dense = torch.randn(2, 256, GRID, GRID, generator=g)
    with torch.no_grad():
        sparse, _ = tracker.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        image_pe = tracker.sam_prompt_encoder.get_dense_pe()
    return feat, image_pe, sparse, dense, high_res


def test_mask_decoder(setup):
    seed, tracker, heads = setup
    feat, image_pe, sparse, dense, high_res = _decoder_inputs(seed, tracker)
    dec, ours = tracker.sam_mask_decoder, heads.mask_decoder
    args = (_nhwc(feat), _nhwc(image_pe), _j(sparse), _nhwc(dense), tuple(_nhwc(h) for h in high_res))
    with torch.no_grad():
        ref_all = dec.predict_masks(
            feat, image_pe, sparse, dense, repeat_image=False, high_res_features=high_res
        )
    out = nnx.jit(lambda m, *a: m.predict_masks(*a))(ours, *args)
    names = ("all masks", "all IoUs", "all mask tokens", "object score logits")
    for field, o, r in zip(names, out, ref_all, strict=True):
        ref = upstream.nchw_to_nhwc(r) if r.ndim == 4 else upstream.to_numpy(r)
        # The object scores are 2 numbers, and when both happen to be small their max is a poor
        # scale for the float32 round-off the decoder accumulates.
        floor = upstream.LOGIT_SCALE if field == "object score logits" else 0.0
        upstream.report(f"mask decoder {field}", o, ref, TOL, floor=floor)

    for multimask in (True, False):
        with torch.no_grad():
            ref = dec(
                feat,
                image_pe,
                sparse,
                dense,
                multimask_output=multimask,
                repeat_image=False,
                high_res_features=high_res,
            )
        out = nnx.jit(lambda m, *a, mm=multimask: m(*a, multimask_output=mm))(ours, *args)
        kind = "multimask" if multimask else "single mask"
        upstream.report(f"mask decoder {kind}: masks", out.masks, upstream.nchw_to_nhwc(ref[0]), TOL)
        upstream.report(f"mask decoder {kind}: IoUs", out.ious, upstream.to_numpy(ref[1]), TOL)
        upstream.report(f"mask decoder {kind}: SAM tokens", out.sam_tokens, upstream.to_numpy(ref[2]), TOL)
        upstream.report(
            f"mask decoder {kind}: object scores",
            out.object_score_logits,
            upstream.to_numpy(ref[3]),
            TOL,
            floor=upstream.LOGIT_SCALE,
        )


def test_stability_selection(setup):
    """The single-mask stability fallback on a batch built to take every branch."""
    seed, tracker, heads = setup
    dec = tracker.sam_mask_decoder
    g = _gen(seed, 5)
    masks = torch.randn(4, 4, 4 * GRID, 4 * GRID, generator=g)
    masks[0, 0] *= 100  # sharp: stable, mask 0 kept
    masks[1, 0] *= 1e-3  # inside ±δ almost everywhere: unstable, best multimask taken
    masks[2, 0] = -masks[2, 0].abs() - 1  # nothing above −δ: stability 1 by definition
    masks[3, 0] = masks[3, 0] * 0.05 + 0.3  # mostly above +δ but a band of ~2% near 0: borderline
    ious = torch.rand(4, 4, generator=g)
    with torch.no_grad():
        stable = (dec._get_stability_scores(masks[:, 0:1]) >= dec.dynamic_multimask_stability_thresh)[:, 0]
        ref_masks, ref_ious = dec._dynamic_multimask_via_stability(masks, ious)
    assert stable[:3].tolist() == [True, False, True]
    ours_masks, ours_ious = heads.mask_decoder.stable_single_mask(_nhwc(masks), _j(ious))
    upstream.report("stability fallback masks", ours_masks, upstream.nchw_to_nhwc(ref_masks), 0.0)
    upstream.report("stability fallback IoUs", ours_ious, upstream.to_numpy(ref_ious), 0.0)


def _split_presence(tracker, run) -> float:
    """Shift the object-score head's last bias so batch items 0 and 1 fall on opposite sides of 0.

    Random weights give every item the same sign; the split exercises both the object and the
    no-object branch (NO_OBJ_SCORE masks, `no_obj_ptr`) in one batch. Returns the shift.
    """
    with torch.no_grad():
        logits = run()[6][:2, 0]
        shift = float(logits.mean())
        tracker.sam_mask_decoder.pred_obj_score_head.layers[2].bias -= shift
        logits = run()[6][:2, 0]
    print(f"object score logits {logits.tolist()} after a shift of {-shift:.4f}")
    assert (logits[0] > 0) != (logits[1] > 0), logits
    return shift


_OUTPUTS = (
    "low-res multimasks",
    "high-res multimasks",
    "IoUs",
    "low-res masks",
    "high-res masks",
    "object pointer",
    "object score logits",
)


def _check_heads(name: str, ours, ref, score_shift: float = 0.0) -> None:
    """Report every `_forward_sam_heads` output.

    score_shift (from `_split_presence`) is added back to both object scores: the shifted
    scores are a small difference of large terms, so their own magnitude is not the scale of
    the computation's rounding.
    """
    present = upstream.to_numpy(ref[6])[:, 0] > 0
    assert np.array_equal(np.asarray(ours[6])[:, 0] > 0, present)
    for field, o, r in zip(_OUTPUTS, ours, ref, strict=True):
        r = upstream.nchw_to_nhwc(r) if r.ndim == 4 else upstream.to_numpy(r)
        o = np.asarray(o)
        if r.ndim == 4:
            # NO_OBJ_SCORE (−1024) would dilute the relative error: check items with an object alone.
            for item in np.flatnonzero(present):
                upstream.report(f"{name}: {field} (object present, item {item})", o[item], r[item], TOL)
            absent = ~present
            if absent.any():
                upstream.report(f"{name}: {field} (no object)", o[absent], r[absent], TOL)
        elif field == "object score logits":
            upstream.report(
                f"{name}: {field} (+ shift)",
                o + score_shift,
                r + score_shift,
                TOL,
                floor=upstream.LOGIT_SCALE,
            )
        else:
            upstream.report(f"{name}: {field}", o, r, TOL)


def _run_heads(tracker, heads, feat, high_res, points, multimask):
    def ref():
        point_inputs = None if points is None else {"point_coords": points[0], "point_labels": points[1]}
        with torch.no_grad():
            return tracker._forward_sam_heads(
                feat, point_inputs=point_inputs, high_res_features=high_res, multimask_output=multimask
            )

    def ours():
        fn = nnx.jit(lambda t, *a, **k: t.sam_heads(*a, **k), static_argnames="multimask_output")
        return fn(
            heads.tracker,
            _nhwc(feat),
            tuple(_nhwc(h) for h in high_res),
            points=None if points is None else (_j(points[0]), _j(points[1])),
            multimask_output=multimask,
        )

    return ref, ours


@pytest.mark.parametrize("clicks", [0, 2], ids=["no-clicks-multimask", "two-clicks-single-mask"])
def test_forward_sam_heads(tmp_path, clicks):
    seed = upstream.fresh_seed()
    tracker = upstream.build_tracker(seed)
    g = _gen(seed, 6)
    feat, high_res = _frame(g, 2)
    points = _points(g, 2, [1, 0]) if clicks else None
    ref, _ = _run_heads(tracker, None, feat, high_res, points, clicks <= 1)
    shift = _split_presence(tracker, ref)
    heads = Heads(tracker, tmp_path / "sam3.pt", seed)
    ref, ours = _run_heads(tracker, heads, feat, high_res, points, clicks <= 1)
    _check_heads(f"_forward_sam_heads, {clicks} clicks", ours(), ref(), shift)


def test_forward_sam_heads_stability_fallback(tmp_path):
    """Two clicks (single mask) with mask token 0 made unstable: the best multimask output is used."""
    seed = upstream.fresh_seed()
    tracker = upstream.build_tracker(seed)
    with torch.no_grad():
        last = tracker.sam_mask_decoder.output_hypernetworks_mlps[0].layers[2]
        last.weight *= 1e-4
        last.bias *= 1e-4
    g = _gen(seed, 7)
    feat, high_res = _frame(g, 2)
    points = _points(g, 2, [1, 1])
    ref, _ = _run_heads(tracker, None, feat, high_res, points, False)
    shift = _split_presence(tracker, ref)
    dec = tracker.sam_mask_decoder
    with torch.no_grad():
        sparse, dense = tracker.sam_prompt_encoder(points=points, boxes=None, masks=None)
        all_masks = dec.predict_masks(
            feat,
            tracker.sam_prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            repeat_image=False,
            high_res_features=high_res,
        )[0]
        stability = dec._get_stability_scores(all_masks[:, 0:1])
    assert (stability < dec.dynamic_multimask_stability_thresh).all(), stability
    heads = Heads(tracker, tmp_path / "sam3.pt", seed)
    ref, ours = _run_heads(tracker, heads, feat, high_res, points, False)
    _check_heads("_forward_sam_heads, stability fallback", ours(), ref(), shift)


def test_use_mask_as_output(setup):
    seed, tracker, heads = setup
    g = _gen(seed, 8)
    feat, high_res = _frame(g, 2)
    size = tracker.input_mask_size  # 1152
    mask = (torch.rand(2, 1, size, size, generator=g) > 0.7).float()
    mask[1] = 0  # an empty mask: object absent, no_obj_ptr
    with torch.no_grad():
        ref = tracker._use_mask_as_output(feat, high_res, mask)
    fn = nnx.jit(lambda t, *a: t.mask_as_output(*a))
    ours = fn(
        heads.tracker,
        _nhwc(feat),
        tuple(_nhwc(h) for h in high_res),
        _nhwc(mask),
    )
    for field, o, r in zip(_OUTPUTS, ours, ref, strict=True):
        r = upstream.nchw_to_nhwc(r) if r.ndim == 4 else upstream.to_numpy(r)
        upstream.report(f"_use_mask_as_output: {field}", o, r, TOL)
    with torch.no_grad():
        ref_prompt = tracker.mask_downsample(mask)
    upstream.report(
        "mask_downsample", heads.tracker.mask_downsample(_nhwc(mask)), upstream.nchw_to_nhwc(ref_prompt), TOL
    )


def test_object_pointer(setup):
    seed, tracker, heads = setup
    g = _gen(seed, 9)
    tokens = torch.randn(5, 256, generator=g)
    with torch.no_grad():
        ref = tracker.obj_ptr_proj(tokens)
    upstream.report("obj_ptr_proj", heads.tracker.obj_ptr_proj(_j(tokens)), upstream.to_numpy(ref), TOL)

    rel = [0, 1, 2, 5, 15, -3, 40]
    for max_abs_pos in (16, 5, None):
        with torch.no_grad():
            ref = tracker._get_tpos_enc(rel, device="cpu", max_abs_pos=max_abs_pos)
        # The step divides by the pointers it reads less one (upstream `max_abs_pos − 1`, 1 when None).
        scale = 1 if max_abs_pos is None else max_abs_pos - 1
        ours = heads.tracker.pointer_pos(jnp.asarray(rel), scale)
        upstream.report(
            f"object pointer temporal encoding (max_abs_pos={max_abs_pos})", ours, upstream.to_numpy(ref), TOL
        )
