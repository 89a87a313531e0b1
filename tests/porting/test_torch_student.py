"""The PyTorch twins (`porting.torch_student`) and the STUDENT key table, in both directions."""

from pathlib import Path

import numpy as np
import pytest

from es3_jax import config
from es3_jax.models.student import student_from_config
from es3_jax.params import abstract_shapes, flatten
from porting.keymap import STUDENT_TABLE, TRACKER_TABLE
from tests import upstream

torch = upstream.torch
from porting.sam3_checkpoint import port_state_dict, port_student, student_to_torch  # noqa: E402
from porting.torch_student import (  # noqa: E402
    TorchMemoryAttention,
    rope_angles,
    torch_student_from_config,
    twin_state_dict,
)

pytestmark = pytest.mark.parity

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _config_path(name: str) -> Path:
    return CONFIGS / f"{name}.yaml"


def test_twin_memory_attention_is_the_upstream_teacher():
    """With 4 layers the twin loads upstream's `tracker.transformer.encoder` weights strictly and
    computes the same output (2 raw 8×8 frames + 2 pointers; keys rotated on the query grid)."""
    seed = upstream.fresh_seed()
    encoder = upstream.build_tracker(seed).transformer.encoder
    twin = TorchMemoryAttention(4).eval()
    twin.load_state_dict(encoder.state_dict(), strict=True)
    grid, frames, ptr = 8, 2, 8
    g = torch.Generator().manual_seed(seed)
    src, src_pos = (
        torch.randn(2, grid * grid, 256, generator=g),
        torch.randn(2, grid * grid, 256, generator=g),
    )
    nk = frames * grid * grid + ptr
    memory, memory_pos = torch.randn(2, nk, 64, generator=g), torch.randn(2, nk, 64, generator=g)
    with torch.no_grad():
        ref = encoder(
            src=[src.transpose(0, 1)],
            src_key_padding_mask=[None],
            src_pos=[src_pos.transpose(0, 1)],
            prompt=memory.transpose(0, 1),
            prompt_pos=memory_pos.transpose(0, 1),
            prompt_key_padding_mask=None,
            num_obj_ptr_tokens=ptr,
        )["memory"].transpose(0, 1)
        n = torch.arange(grid * grid)
        xs, ys = (n % grid).float().repeat(frames), (n // grid).float().repeat(frames)
        angles = torch.cat([rope_angles(xs, ys, 256, 10000.0), torch.zeros(ptr, 128)])
        ours = twin(src, src_pos, memory, memory_pos, (grid, grid), angles)
    upstream.report(
        "torch twin memory attention vs upstream encoder", ours.numpy(), upstream.to_numpy(ref), 1e-5
    )


@pytest.mark.parametrize("name", ["efficient_memory", "efficienttam_like"])
def test_student_table_round_trip(name):
    """Twin keys -> es3 params -> twin keys is bit-exact, and the params bind to the JAX student strictly."""
    cfg = config.load(_config_path(name))
    twin = torch_student_from_config(cfg)
    upstream.randomize_(twin, upstream.fresh_seed())
    exported = {k: upstream.to_numpy(v) for k, v in twin_state_dict(twin).items()}
    assert all(STUDENT_TABLE.consumes(k) for k in exported)
    shapes = abstract_shapes(lambda: student_from_config(cfg))
    params = port_student(exported, shapes, "twin")  # strict: every parameter present with its shape
    student_from_config(cfg, params)
    back = student_to_torch(params)
    assert sorted(back) == sorted(exported)
    for key, value in exported.items():
        assert back[key].tobytes() == value.tobytes(), key


def test_merged_export_ports_with_the_tracker_table():
    """A sam3.pt whose memory attention is the 2-layer student's and which adds the perceiver ports
    through the production table: the student's params land under their es3 paths."""
    seed = upstream.fresh_seed()
    model = upstream.sam3_checkpoint_dict(upstream.build_tracker(seed))
    model = {k: v for k, v in model.items() if not k.startswith("tracker.transformer.encoder.")}
    cfg = config.load(_config_path("efficient_memory"))
    twin = torch_student_from_config(cfg)
    model.update(twin_state_dict(twin))
    ported = port_state_dict({k: upstream.to_numpy(v) for k, v in model.items()}, table=TRACKER_TABLE).params
    student = student_from_config(
        cfg,
        {"memory_attention": ported["memory_attention"], "spatial_perceiver": ported["spatial_perceiver"]},
    )
    assert len(student.memory_attention.layers) == 2
    latents = flatten(ported)["spatial_perceiver.latents"]
    np.testing.assert_array_equal(latents, upstream.to_numpy(twin.spatial_perceiver.latents))
