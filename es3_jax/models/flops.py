"""Parameters and FLOPs of one tracking step's memory path, for the teacher or any student config,
and of one frame through a trunk.

A step encodes one memory frame (memory encoder, then the perceiver when the student has one)
and conditions the current frame on the bank (memory attention). Counted at the steady state of
tracking: 7 memory frames and 16 object pointers (4 tokens each), batch 1.

FLOPs are 2 × the multiply-accumulates of matrix products and convolutions; normalisation,
softmax, activations, RoPE and pooling are left out (a few percent at these sizes). The memory
attention is split into its attention products (self and cross: logits and weighted sums), the
q/k/v/out projections of both attentions, and the FFN. Parameter counts come from the modules
themselves (built abstractly, nothing allocated).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend import core as jax_core

from es3_jax.config import Config
from es3_jax.memory.attention import MemoryAttention
from es3_jax.memory.encoder import MemoryEncoder
from es3_jax.memory.perceiver import PerceiverResampler
from es3_jax.models.trunk import trunk_from_config
from es3_jax.nn.layers import DEPTHWISE_SCOPE, BatchNorm
from es3_jax.params import abstract_shapes

STEADY_FRAMES = 7
STEADY_POINTERS = 16
POINTER_TOKENS = 4  # a d_model pointer is split into d_model / mem_dim tokens (256 / 64)
_MASK_STAGES = 4  # the mask downsampler's stride-2 3×3 convs: 1 -> 4 -> 16 -> 64 -> 256 channels


@dataclasses.dataclass(frozen=True)
class Cost:
    params: int
    flops: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.flops + other.flops)


def _count(factory) -> int:
    return sum(math.prod(s) for s in abstract_shapes(factory).values())


def memory_encoder_cost(d_model: int, mem_dim: int, grid: int) -> Cost:
    """One memory frame on a `grid × grid` feature map (the mask enters at 16× the grid)."""
    hw = grid * grid
    flops = 0.0
    side, cin = 16 * grid, 1
    for _ in range(_MASK_STAGES):
        side //= 2
        flops += 2 * side * side * cin * 4 * cin * 9
        cin *= 4
    flops += 2 * hw * cin * d_model  # downsampler projection
    flops += 2 * hw * d_model * d_model  # pix_feat_proj
    flops += 2 * (2 * hw * d_model * 49 + 2 * 2 * hw * d_model * 4 * d_model)  # two CXBlocks
    flops += 2 * hw * d_model * mem_dim  # out_proj
    params = _count(lambda: MemoryEncoder(d_model, mem_dim, rngs=nnx.Rngs(0)))
    return Cost(params, flops)


def perceiver_cost(
    dim: int,
    num_latents: int,
    num_latents_2d: int,
    depth: int,
    ff_mult: int,
    window_size: int,
    grid: int,
) -> Cost:
    """Compressing one `grid × grid` memory frame."""
    hidden = ff_mult * dim

    def layer(latents: int, context: int, keys_per_latent: int, self_len: int) -> float:
        """latents attending to `keys_per_latent` of `context` tokens, self-attention over `self_len`."""
        f = 2 * latents * dim * dim * 2  # to_q, to_out
        f += 2 * context * dim * 2 * dim  # to_kv over the memory tokens
        f += 4 * latents * keys_per_latent * dim  # logits + weighted sum
        f += 2 * 2 * latents * dim * hidden  # ff
        f += 2 * latents * dim * 4 * dim  # self-attention q, kv, out
        f += 4 * latents * self_len * dim
        f += 2 * 2 * latents * dim * hidden  # self_ff
        return f

    hw = grid * grid
    g = math.isqrt(num_latents_2d)
    windows = (g * window_size) ** 2
    flops = depth * (
        layer(num_latents, hw, hw, num_latents) + layer(num_latents_2d, windows, window_size**2, 1)
    )
    params = _count(
        lambda: PerceiverResampler(
            dim, num_latents, num_latents_2d, depth, 1, ff_mult, window_size, rngs=nnx.Rngs(0)
        )
    )
    return Cost(params, flops)


def memory_attention_cost(
    num_layers: int,
    d_model: int,
    kv_dim: int,
    ffn_dim: int,
    num_queries: int,
    num_keys: int,
    num_attended_keys: int,
) -> dict[str, Cost]:
    """Per part: `num_keys` memory tokens are projected; `num_attended_keys` remain after pooling."""
    layers = num_layers
    module = {
        p: math.prod(s)
        for p, s in abstract_shapes(
            lambda: MemoryAttention(num_layers, d_model, kv_dim, ffn_dim, rngs=nnx.Rngs(0))
        ).items()
    }
    proj_params = sum(n for p, n in module.items() if "attn" in p)
    nq, d = num_queries, d_model
    projections = 2 * nq * d * d * 4 + 2 * nq * d * d * 2 + 2 * num_keys * kv_dim * d * 2
    return {
        "self_attention": Cost(0, layers * 4 * nq * nq * d),
        "cross_attention": Cost(0, layers * 4 * nq * num_attended_keys * d),
        "projections": Cost(proj_params, layers * projections),
        "ffn": Cost(sum(module.values()) - proj_params, layers * 2 * 2 * nq * d * ffn_dim),
    }


def memory_path_cost(
    cfg: Config,
    *,
    teacher: bool = False,
    grid: int | None = None,
    num_frames: int = STEADY_FRAMES,
    num_pointers: int = STEADY_POINTERS,
) -> dict[str, Cost]:
    """One tracking step's memory path: `memory_encoder`, `perceiver` (student only) and the
    `memory_attention.*` parts, for the teacher (`teacher=True`) or the student of `cfg`.

    grid: the feature grid side (default: the tracker's, 72).
    """
    t, pc, mc = cfg.MODEL.TEACHER, cfg.MODEL.PERCEIVER, cfg.MODEL.MEMORY_ATTENTION
    grid = grid or t.grid
    costs = {"memory_encoder": memory_encoder_cost(t.D_MODEL, t.MEM_DIM, grid)}
    pointer_tokens = num_pointers * POINTER_TOKENS
    if teacher:
        layers, per_frame, attended = t.MEMORY_ATTENTION_LAYERS, grid * grid, grid * grid
    else:
        layers, pool = mc.NUM_LAYERS, mc.POOL_SIZE
        if pc.ENABLED:
            g = math.isqrt(pc.NUM_LATENTS_2D)
            per_frame = pc.NUM_LATENTS + g * g
            attended = pc.NUM_LATENTS + (g // pool) ** 2
            costs["perceiver"] = perceiver_cost(
                t.MEM_DIM, pc.NUM_LATENTS, pc.NUM_LATENTS_2D, pc.DEPTH, pc.FF_MULT, pc.WINDOW_SIZE, grid
            )
        else:
            per_frame, attended = grid * grid, (grid // pool) ** 2
    parts = memory_attention_cost(
        layers,
        t.D_MODEL,
        t.MEM_DIM,
        t.MEMORY_ATTENTION_FFN_DIM,
        grid * grid,
        num_frames * per_frame + pointer_tokens,
        num_frames * attended + pointer_tokens,
    )
    costs.update({f"memory_attention.{k}": v for k, v in parts.items()})
    return costs


def total(costs: dict[str, Cost], prefix: str = "") -> Cost:
    """The sum of the parts whose names start with `prefix`."""
    return sum((c for k, c in costs.items() if k.startswith(prefix)), Cost(0, 0.0))


def gflops(cost: Cost) -> float:
    return cost.flops / 1e9


# --- trunks ----------------------------------------------------------------------------------------
#
# A trunk is counted from its traced program, not by hand: the three stage-1 families and the ViT
# have dozens of block types between them, and the program is what runs. The same convention as
# above: 2 × the multiply-accumulates of every matrix product and convolution, depthwise ones
# (sums of shifted products, `nn.layers.DepthwiseConv`) included.


def _matmul_flops(eqn) -> float:
    if eqn.primitive.name == "mul" and DEPTHWISE_SCOPE in str(eqn.source_info.name_stack):
        return 2.0 * math.prod(eqn.outvars[0].aval.shape)  # one tap of a depthwise conv
    if eqn.primitive.name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        out = eqn.outvars[0].aval.shape
        return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
    if eqn.primitive.name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
        per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])  # in / groups × kernel area
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
    return 0.0


def _jaxpr_flops(jaxpr) -> float:
    flops = 0.0
    for eqn in jaxpr.eqns:
        flops += _matmul_flops(eqn)
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in jax_core.jaxprs_in_params(eqn.params):
            flops += times * _jaxpr_flops(sub)
    return flops


def trunk_cost(cfg: Config) -> Cost:
    """One frame at `MODEL.TEACHER.IMAGE_SIZE` through the trunk `MODEL.TRUNK` describes (traced
    abstractly: nothing is allocated or computed)."""
    size = cfg.MODEL.TEACHER.IMAGE_SIZE
    trunk = nnx.eval_shape(lambda: trunk_from_config(cfg))
    graphdef, state = nnx.split(trunk)
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    closed = jax.make_jaxpr(lambda st, x: nnx.merge(graphdef, st)(x))(state, images)
    stored = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(trunk, nnx.Param)))
    # Running statistics are held as parameters of a frozen BatchNorm; they are not counted as such.
    stats = sum(2 * math.prod(m.mean.shape) for _, m in nnx.iter_graph(trunk) if isinstance(m, BatchNorm))
    return Cost(stored - stats, _jaxpr_flops(closed.jaxpr))
