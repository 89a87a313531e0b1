"""Multi-head attention with optional rotary positions, additive key bias and key masking, over one core.

One module serves the mask decoder's two-way transformer (no RoPE), the teacher memory
attention (RoPE on queries and spatial keys) and the student variants (pooled keys with a
log(p²) bias, compressed memories with their own key positions).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from es3_jax.nn.blocked_attention import Blocks, blocked_attention
from es3_jax.nn.layers import Dtype, linear
from es3_jax.nn.rope import apply_rope

# Block targets of the online-softmax form per platform. On a CPU one batch entry at a time (a few
# where each is small) keeps a block's float32 logits near the cache's size; 512 × 1024 blocks ran
# as fast as any other split on a 2-core EPYC. A GPU takes whole query sets, long key blocks and the
# whole batch, so each matmul fills the device while a block's logits stay a fraction of all of them.
BLOCKS = {"cpu": Blocks(q=512, k=1024, logits=2**19), "gpu": Blocks(q=8192, k=4096)}
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# Every cuDNN fused-attention GPU (Ampere on) takes 128; Hopper's 256 needs the device to check.
CUDNN_MAX_HEAD_DIM = 128

_platform: contextvars.ContextVar[str | None] = contextvars.ContextVar("es3_attention_platform", default=None)
_cudnn_allowed: contextvars.ContextVar[bool] = contextvars.ContextVar("es3_attention_cudnn", default=True)


@contextlib.contextmanager
def lowering_for(platform: str) -> Iterator[None]:
    """Attention traced inside is chosen for `platform` ('cpu' or 'gpu') instead of JAX's default backend.

    For programs compiled for devices this process does not drive (a GPU compile on a CPU host).
    JAX caches a function's trace whatever this choice, so entering and leaving clear its caches:
    a function traced for the CPU before is traced again for `platform`, and back.
    """
    if platform not in BLOCKS:
        raise ValueError(f"no attention for platform {platform!r}: one of {sorted(BLOCKS)}")
    jax.clear_caches()
    token = _platform.set(platform)
    try:
        yield
    finally:
        _platform.reset(token)
        jax.clear_caches()


@contextlib.contextmanager
def without_cudnn() -> Iterator[None]:
    """Attention traced inside takes the blocked form on GPUs too.

    For code under `jax.vmap` whose queries may not vary along the mapped axis while its keys do
    (SAM's output tokens attending to each clip's image): JAX 0.10.2's batching rule for cuDNN's
    attention reshapes queries, keys and values by the queries' batch and fails on such a mix.
    """
    token = _cudnn_allowed.set(False)
    try:
        yield
    finally:
        _cudnn_allowed.reset(token)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention with float32 logits and softmax statistics, never holding all logits.

    q: `[B, Nq, H, Dh]`, k and v: `[B, Nk, H, Dh]` -> `[B, Nq, H, Dh]`.
    bias: additive logits broadcastable to `[B, H, Nq, Nk]`; mask: boolean, same broadcast, True = attend.
    The scale is `1/sqrt(Dh)`, as in torch's `scaled_dot_product_attention`.

    On a GPU, cuDNN's fused kernel where it takes the problem (`cudnn_fits`), else the blocked
    online softmax of `blocked_attention`, which is also the CPU's form.
    """
    # The scope names this core's operations in compiled programs (benchmarks/gpu_program.py reads
    # how each attention was compiled by it).
    with jax.named_scope("attend"):
        platform = _platform.get() or jax.default_backend()
        if platform == "gpu" and _cudnn_allowed.get() and cudnn_fits(q, k, v, bias=bias, mask=mask):
            return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="cudnn")
        return blocked_attention(q, k, v, bias=bias, mask=mask, blocks=BLOCKS.get(platform, BLOCKS["gpu"]))


def cudnn_fits(
    q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None, mask: jax.Array | None = None
) -> bool:
    """Whether cuDNN's fused attention takes this problem on any supported GPU.

    It needs 16-bit inputs of one dtype, a head dim that is a multiple of 8 up to 128, and a
    bias or mask (if any) given for every query and key: it does not broadcast them along
    queries or keys (the per-key terms of a memory bank), and training with a bias needs even
    sequence lengths.
    """
    if not q.ndim == k.ndim == v.ndim == 4:
        return False
    nq, nk, dh = q.shape[1], k.shape[1], q.shape[-1]
    if not (q.dtype == k.dtype == v.dtype and q.dtype in CUDNN_DTYPES):
        return False
    if dh > CUDNN_MAX_HEAD_DIM or dh % 8 or v.shape[-1] != dh:
        return False
    for term in (bias, mask):
        if term is not None and (term.ndim != 4 or term.shape[-2:] != (nq, nk)):
            return False
    return (bias is None and mask is None) or (nq % 2 == 0 and nk % 2 == 0)


class Attention(nnx.Module):
    """SAM's `Attention`: q/k/v projections to `embed_dim // downsample_rate`, heads, output projection.

    Parameter names mirror upstream (`q_proj`, `k_proj`, `v_proj`, `out_proj`).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        downsample_rate: int = 1,
        kv_in_dim: int | None = None,
        dtype: Dtype = jnp.float32,
    ):
        internal = embed_dim // downsample_rate
        if internal % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the internal width {internal}")
        kv_in = kv_in_dim or embed_dim
        self.num_heads = num_heads
        self.q_proj = linear(embed_dim, internal, rngs=rngs, dtype=dtype)
        self.k_proj = linear(kv_in, internal, rngs=rngs, dtype=dtype)
        self.v_proj = linear(kv_in, internal, rngs=rngs, dtype=dtype)
        self.out_proj = linear(internal, embed_dim, rngs=rngs, dtype=dtype)

    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        q_angles: jax.Array | None = None,
        k_angles: jax.Array | None = None,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """q: `[B, Nq, C]`, k/v: `[B, Nk, Ckv]` -> `[B, Nq, C]`.

        q_angles `[Nq, Dh/2]` and k_angles `[Nk, Dh/2]` (or batched `[B, N, Dh/2]`) rotate the
        projected queries and keys; a key with angle 0 is left as it is.
        """
        q, k, v = self.project_qkv(q, k, v, q_angles=q_angles, k_angles=k_angles)
        return self.attend_projected(q, k, v, bias=bias, mask=mask)

    def project_qkv(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        q_angles: jax.Array | None = None,
        k_angles: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Project and split heads -> `[B, N, H, Dh]` each, RoPE applied to q and k when given."""
        q = self._heads(self.q_proj(q))
        k = self._heads(self.k_proj(k))
        v = self._heads(self.v_proj(v))
        if q_angles is not None:
            q = apply_rope(q, _per_head(q_angles))
        if k_angles is not None:
            k = apply_rope(k, _per_head(k_angles))
        return q, k, v

    def attend_projected(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Attention over already projected heads, then the output projection -> `[B, Nq, C]`."""
        out = attend(q, k, v, bias=bias, mask=mask)
        return self.out_proj(out.reshape(*out.shape[:2], -1))

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:2], self.num_heads, x.shape[-1] // self.num_heads)


def _per_head(angles: jax.Array) -> jax.Array:
    """`[N, A]` or `[B, N, A]` -> broadcastable against `[B, N, H, Dh]` (the same angles in every head)."""
    return angles[..., None, :]
