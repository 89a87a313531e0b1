"""The Perceiver Resampler (`es3_jax.memory.perceiver`) against transformers' EdgeTamVideo resampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from es3_jax.memory.perceiver import PerceiverResampler
from es3_jax.params import bind
from porting.keymap import STUDENT_TABLE
from tests import upstream

torch = upstream.torch
from porting.checkpoint_file import read_checkpoint  # noqa: E402
from porting.sam3_checkpoint import port_state_dict  # noqa: E402

edgetam = pytest.importorskip("transformers.models.edgetam_video.modeling_edgetam_video")
from transformers.models.edgetam_video.configuration_edgetam_video import EdgeTamVideoConfig  # noqa: E402

from porting.torch_student import TorchPerceiverResampler  # noqa: E402

pytestmark = pytest.mark.parity

DIM = 64

# transformers' EdgeTamVideo names -> EdgeTAM's (the export's), per layer; k_proj/v_proj are fused.
_HF_LAYER = {
    "cross_attention.q_proj": "attn.to_q",
    "cross_attention.o_proj": "attn.to_out",
    "self_attention.q_proj": "self_attn.to_q",
    "self_attention.o_proj": "self_attn.to_out",
    "layer_norm_input": "attn.norm_x",
    "layer_norm_latents": "attn.norm_latents",
    "layer_norm_self": "self_attn.norm",
    "mlp.layer_norm": "ff.0",
    "mlp.up_proj": "ff.1",
    "mlp.down_proj": "ff.3",
    "self_mlp.layer_norm": "self_ff.0",
    "self_mlp.up_proj": "self_ff.1",
    "self_mlp.down_proj": "self_ff.3",
}


def _hf_to_export(sd: dict) -> dict:
    """An EdgeTamVideo resampler state dict -> `tracker.spatial_perceiver.*` keys (EdgeTAM's layout)."""
    out = {"latents": sd["latents_1d"], "latents_2d": sd["latents_2d"]}
    out["norm.weight"], out["norm.bias"] = sd["layer_norm.weight"], sd["layer_norm.bias"]
    layers = {int(k.split(".")[1]) for k in sd if k.startswith("layers.")}
    for i in layers:
        p = f"layers.{i}."
        for hf, ours in _HF_LAYER.items():
            for suffix in ("weight", "bias"):
                if f"{p}{hf}.{suffix}" in sd:
                    out[f"{p}{ours}.{suffix}"] = sd[f"{p}{hf}.{suffix}"]
        for a, b in (("cross_attention", "attn"), ("self_attention", "self_attn")):
            out[f"{p}{b}.to_kv.weight"] = torch.cat(
                [sd[f"{p}{a}.k_proj.weight"], sd[f"{p}{a}.v_proj.weight"]]
            )
    return {f"tracker.spatial_perceiver.{k}": v.detach().clone() for k, v in out.items()}


def _port(tmp_path, export: dict, **kwargs) -> PerceiverResampler:
    """Through the production readers: a sam3.pt file, `read_checkpoint`, `port_state_dict`, `bind`."""
    path = upstream.save_sam3_checkpoint(tmp_path / "sam3.pt", export)
    params = port_state_dict(read_checkpoint(path)[0], table=STUDENT_TABLE).params["spatial_perceiver"]
    return bind(lambda: PerceiverResampler(DIM, rngs=nnx.Rngs(0), **kwargs), params, "spatial_perceiver")


@pytest.fixture(scope="module")
def hf_perceiver():
    """transformers' EdgeTamVideo resampler (EdgeTAM geometry: 256 + 16×16 latents, dim 64) with fresh weights."""
    module = edgetam.EdgeTamVideoPerceiverResampler(EdgeTamVideoConfig()).eval()
    upstream.randomize_(module, upstream.fresh_seed())
    return module


def _inputs(seed: int, batch: int, size: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, DIM, size, size, generator=g), torch.randn(batch, DIM, size, size, generator=g)


def _ours(module, features, pos):
    return jax.jit(lambda f, p: module(f, p))(
        jnp.asarray(upstream.nchw_to_nhwc(features)), jnp.asarray(upstream.nchw_to_nhwc(pos))
    )


def test_edgetam_parity(tmp_path, hf_perceiver):
    """EdgeTAM's geometry: a 64×64 memory, 16×16 windows of 4×4; batch 1 (transformers fails beyond)."""
    ours_module = _port(tmp_path, _hf_to_export(hf_perceiver.state_dict()))
    features, pos = _inputs(upstream.fresh_seed(), 1, 64)
    with torch.no_grad():
        ref_tokens, ref_pos = hf_perceiver(features, pos)
    tokens, tokens_pos = _ours(ours_module, features, pos)
    assert tokens.shape == (1, 512, DIM)
    upstream.report(
        "perceiver vs EdgeTamVideo, 64x64 memory: tokens", tokens, upstream.to_numpy(ref_tokens), 1e-5
    )
    upstream.report("perceiver vs EdgeTamVideo: positions", tokens_pos, upstream.to_numpy(ref_pos), 1e-5)
    np.testing.assert_array_equal(np.asarray(tokens_pos[:, :256]), 0.0)
    assert np.abs(np.asarray(tokens_pos[:, 256:])).max() <= 1.0


@pytest.mark.numerics
def test_batch_and_resize_against_torch_twin(tmp_path, hf_perceiver):
    """Batch 3 on SAM3's 72×72 memory (resized to 64×64): equal to the PyTorch twin, and per element."""
    twin = TorchPerceiverResampler().eval()
    twin.load_state_dict(
        {
            k.removeprefix("tracker.spatial_perceiver."): v
            for k, v in _hf_to_export(hf_perceiver.state_dict()).items()
        }
    )
    features, pos = _inputs(upstream.fresh_seed(), 1, 64)
    with torch.no_grad():
        upstream.report(
            "torch twin perceiver vs EdgeTamVideo",
            upstream.to_numpy(twin(features, pos)[0]),
            upstream.to_numpy(hf_perceiver(features, pos)[0]),
            1e-5,
        )
    module = _port(tmp_path, _hf_to_export(hf_perceiver.state_dict()))
    features, pos = _inputs(upstream.fresh_seed(), 3, 72)
    with torch.no_grad():
        ref_tokens, ref_pos = twin(features, pos)
    tokens, tokens_pos = _ours(module, features, pos)
    upstream.report(
        "perceiver 72x72 -> 64x64, B=3, vs torch twin", tokens, upstream.to_numpy(ref_tokens), 1e-5
    )
    upstream.report("perceiver positions, B=3, vs torch twin", tokens_pos, upstream.to_numpy(ref_pos), 1e-5)
    single, _ = _ours(module, features[1:2], pos[1:2])
    upstream.report("perceiver B=3 element 1 vs B=1", tokens[1:2], single, upstream.REORDERED)


def test_2d_latents_see_only_their_window():
    """Perturbing memory rows 0-3, cols 4-7 changes every global latent but only 2-D latent #1."""
    module = PerceiverResampler(DIM, 8, 16, rngs=nnx.Rngs(0))  # 4×4 latents over a 16×16 memory
    rng = np.random.default_rng(upstream.fresh_seed())
    features = rng.standard_normal((1, 16, 16, DIM)).astype(np.float32)
    pos = rng.standard_normal((1, 16, 16, DIM)).astype(np.float32)
    base, _ = module(jnp.asarray(features), jnp.asarray(pos))
    features[0, 0:4, 4:8] += 1.0
    moved, _ = module(jnp.asarray(features), jnp.asarray(pos))
    changed = np.abs(np.asarray(moved - base)).max(axis=-1)[0] > 0
    assert changed[:8].all()
    assert np.flatnonzero(changed[8:]).tolist() == [1]


def test_window_size_sets_the_resize():
    """18×18 latents of 4×4 windows tile 72×72 exactly; any memory size is accepted."""
    module = PerceiverResampler(DIM, 4, 9, rngs=nnx.Rngs(0))  # 3×3 latents -> 12×12 windows area
    for size in (12, 16, 9):
        tokens, pos = module(jnp.ones((2, size, size, DIM)), jnp.zeros((2, size, size, DIM)))
        assert tokens.shape == pos.shape == (2, 13, DIM)
    with pytest.raises(ValueError, match="square"):
        PerceiverResampler(DIM, 4, 10, rngs=nnx.Rngs(0))
