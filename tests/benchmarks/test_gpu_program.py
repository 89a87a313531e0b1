"""XLA:GPU programs compiled here for an H100 that is not here: what the compiler reports of them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks.gpu_program import GpuCompileError, attention_report, compile_program
from benchmarks.gpu_targets import TARGETS, topology
from es3_jax.nn.attention import BLOCKS, attend, lowering_for, without_cudnn
from es3_jax.nn.blocked_attention import block_length

H100 = TARGETS["h100"]


@pytest.fixture(scope="module")
def gpus():
    return topology(H100, 2)


def _on(device, *shapes, dtype=jnp.bfloat16):
    one = jax.sharding.SingleDeviceSharding(device)
    return [jax.ShapeDtypeStruct(s, dtype, sharding=one) for s in shapes]


def test_the_topology_is_of_the_described_gpu(gpus):
    assert len(gpus) == 2
    assert {d.device_kind for d in gpus} == {"NVIDIA H100 80GB HBM3"}
    assert {d.platform for d in gpus} == {"gpu"}


def test_a_pod_of_two_hosts_compiles_as_one_program():
    pod = topology(H100, 16, hosts=2)
    assert sorted({d.process_index for d in pod}) == [0, 1] and len(pod) == 16
    mesh = jax.sharding.Mesh(np.array(pod).reshape(16, 1), ("data", "fsdp"))
    x = jax.ShapeDtypeStruct((64, 256), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("data")))
    w = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    program = compile_program("pod", lambda: jax.jit(lambda x, w: jnp.sum(x @ w)).lower(x, w), H100)
    # Each device holds its 4 rows; the sum crosses devices.
    assert program.memory["argument_gib"] * 2**30 == 2 * (4 * 256 + 256 * 256)
    assert "all-reduce" in program.compiled.as_text()


def test_a_matmul_counts_its_flops_and_bytes(gpus):
    m, k, n = 512, 1024, 768
    a, b = _on(gpus[0], (m, k), (k, n))
    program = compile_program("matmul", lambda: jax.jit(jnp.matmul).lower(a, b), H100)
    roofline = program.roofline()
    assert roofline["tflop"] * 1e12 == pytest.approx(2 * m * k * n, rel=1e-6)
    # It reads both operands and writes the product at least once (bf16).
    assert roofline["gib_moved"] * 2**30 >= 2 * (m * k + k * n + m * n)
    assert program.memory["argument_gib"] * 2**30 == 2 * (m * k + k * n)
    assert program.memory["output_gib"] * 2**30 == 2 * m * n


def test_a_loop_counts_its_body_as_often_as_it_runs(gpus):
    (a,) = _on(gpus[0], (256, 256))

    def repeated(x):
        return jax.lax.fori_loop(0, 5, lambda _, y: jnp.tanh(y @ x), x)

    program = compile_program("loop", lambda: jax.jit(repeated).lower(a), H100)
    assert program.roofline()["tflop"] * 1e12 == pytest.approx(5 * 2 * 256**3, rel=1e-6)


def _largest(report_row: dict) -> tuple[str, list[int]]:
    dtype, dims = report_row["array"].rstrip("]").split("[")
    return dtype, [int(n) for n in dims.split(",")]


def test_logits_materialised_by_the_attention_core_are_found(gpus):
    b, nq, nk, h, d = 2, 256, 384, 4, 32
    q, k = _on(gpus[0], (b, nq, h, d), (b, nk, h, d))

    def dense(q, k, v):
        with jax.named_scope("attend"):
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
            return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits).astype(v.dtype), v)

    report = attention_report(compile_program("dense", lambda: jax.jit(dense).lower(q, k, k), H100).kernels)
    assert report and report[0]["implementation"] == "materialised", report
    # The largest array the core writes is the [B, H, Nq, Nk] logits (float32) or their softmax,
    # as XLA lays them out (B and H may be merged into one axis).
    dtype, dims = _largest(report[0])
    assert dtype in ("f32", "bf16") and dims[-2:] == [nq, nk] and np.prod(dims) == b * h * nq * nk, report


def test_the_attention_core_compiles_to_cudnn_where_it_fits_and_to_blocks_elsewhere(gpus):
    """A ViT's heads (bf16, head dim 64) go to cuDNN's fused kernel; a memory bank's single 256-wide
    head with a per-key mask does not fit it and runs as blocks of keys in a loop, never all logits."""
    b, n, h, d = 2, 512, 4, 64
    q, k = _on(gpus[0], (b, n, h, d), (b, n, h, d))
    program = compile_program("vit attention", lambda: jax.jit(attend).lower(q, k, k), H100)
    assert attention_report(program.kernels)[0]["implementation"] == "cudnn fused"

    nq, nk = 256, 9000
    q, k = _on(gpus[0], (b, nq, 1, 256), (b, nk, 1, 256))
    (mask,) = _on(gpus[0], (b, 1, 1, nk), dtype=jnp.bool_)

    def memory_attention(q, k, v, mask):
        return attend(q, k, v, mask=mask)

    program = compile_program(
        "memory attention", lambda: jax.jit(memory_attention).lower(q, k, k, mask), H100
    )
    report = attention_report(program.kernels)
    assert report[0]["implementation"] == "blocked", report
    assert all(np.prod(_largest(row)[1]) < b * nq * nk / 2 for row in report), report


def test_a_program_with_no_gpu_implementation_fails_naming_it(gpus):
    (x,) = _on(gpus[0], (8,), dtype=jnp.float32)

    def cpu_only(x):
        # A foreign function registered for no platform: XLA:GPU has no kernel for it.
        return jax.ffi.ffi_call("es3_test_cpu_only_kernel", jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

    with pytest.raises(GpuCompileError, match=r"^cpu_only_op: does not compile for h100"):
        compile_program("cpu_only_op", lambda: jax.jit(cpu_only).lower(x), H100)


def test_a_fused_attention_is_found_and_counted(gpus):
    """jax.nn.dot_product_attention's cuDNN path compiles to one fused kernel, with no logits in
    device memory; its FLOPs are QKᵀ and PV."""
    b, nq, nk, h, d = 2, 512, 768, 4, 64
    q, k = _on(gpus[0], (b, nq, h, d), (b, nk, h, d))

    def fused(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")

    program = compile_program("fused attention", lambda: jax.jit(fused).lower(q, k, k), H100)
    report = attention_report(program.kernels)
    assert report[0]["implementation"] == "cudnn fused" and report[0]["runs"] == 1, report
    assert program.roofline()["tflop"] * 1e12 == pytest.approx(4 * b * h * nq * nk * d, rel=1e-6)
    assert program.memory["temp_gib"] * 2**30 < b * h * nq * nk  # not even one byte per logit


def test_clip_mapped_attention_with_shared_queries_runs_blocked_on_gpus(gpus):
    """Queries shared by every clip (SAM's output tokens) against each clip's keys, under `jax.vmap`
    as the train step maps its clips: JAX's cuDNN batching rule cannot take the mix, so the step
    traces its attention `without_cudnn`."""
    tokens, (image,) = _on(gpus[0], (3, 7, 8, 16))[0], _on(gpus[0], (4, 3, 256, 8, 16))

    def clips(tokens, image):
        return jax.vmap(lambda img: attend(tokens, img, img))(image)

    with lowering_for("gpu"), pytest.raises(TypeError, match="cannot reshape"):
        jax.jit(clips).lower(tokens, image)
    with without_cudnn():
        program = compile_program("clip-mapped attention", lambda: jax.jit(clips).lower(tokens, image), H100)
    assert not any("fmha" in k.kind for k in program.kernels)


def test_a_function_run_on_the_cpu_first_is_traced_again_for_the_gpu(gpus):
    """The tracking programs run on the CPU before they are compiled for a GPU: JAX's trace cache
    must not hand the GPU compile the CPU's choice of attention (its 512-query blocks)."""
    n = 1200
    fn = jax.jit(attend)
    x = jnp.zeros((1, n, 1, 64), jnp.float32)
    fn(x, x, x)
    (q,) = _on(gpus[0], (1, n, 1, 64), dtype=jnp.float32)
    report = attention_report(compile_program("traced twice", lambda: fn.lower(q, q, q), H100).kernels)
    assert not any(f",{block_length(n, BLOCKS['cpu'].q)}," in row["array"] for row in report), report
