"""The GPUs es3 plans for without having one: their public specifications, as XLA:GPU's target
descriptions, and deviceless topologies of them to compile against.

With the CUDA plugin installed (the `cuda12` extra; no GPU or driver needed), XLA:GPU lowers and
compiles a program for a topology of GPUs that are not there (`jax.experimental.topologies`). The
result is XLA:GPU's own executable: its buffer assignment, its fusions and the kernels it chose,
for the GPU the description names. Autotuning needs the device, so the compiler keeps its default
kernel configurations; the memory plan and the choice of kernels are otherwise the GPU's own.

Sources of the figures (the vendors' public datasheets and the CUDA programming guide):
- SM count, boost clock, memory size and bandwidth, L2: NVIDIA H100 Tensor Core GPU datasheet
  (SXM5: 132 SMs, 1.98 GHz boost, 80 GB HBM3 at 3.35 TB/s, 50 MB L2), NVIDIA H200 datasheet
  (141 GB HBM3e at 4.8 TB/s, the H100's SMs), NVIDIA A100 datasheet (SXM4 80 GB: 108 SMs, 1.41 GHz,
  2.039 TB/s, 40 MB L2).
- Memory as the driver reports it (nvidia-smi's total: H100 81,559 MiB, H200 143,771 MiB, A100
  81,920 MiB); the plan's "fits" compares with this, as JAX's preallocation does.
- Per-SM limits by compute capability (CUDA C++ Programming Guide, "Compute Capabilities"):
  sm_90 228 KiB of shared memory per SM, 227 KiB per block when opted in; sm_80 164 / 163 KiB;
  both 64 Ki registers and 2048 resident threads per SM.
- Dense tensor-core peaks: bf16 989 TFLOP/s and TF32 494 (H100 / H200 SXM), 312 and 156 (A100).
- CUDA 12.9 and cuDNN 9.28: the runtime and cuDNN wheels `pip install "es3-jax[cuda12]"` resolved to
  on 2026-12-07 (nvidia-cuda-runtime-cu12 12.9.79, nvidia-cudnn-cu12 9.28.0.42). XLA:GPU picks its
  cuDNN fusions and attention kernels by these versions.
"""

from __future__ import annotations

import dataclasses
import os

from es3_jax.errors import Es3Error, installed

MIB = 2**20
CUDA_VERSION = (12, 9, 0)
CUDNN_VERSION = (9, 28, 0)


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """One GPU model, as XLA:GPU's cost model and buffer assignment see it."""

    name: str
    device_kind: str  # what JAX reports as `device.device_kind` on the real GPU
    compute_capability: tuple[int, int]
    sm_count: int
    clock_ghz: float
    memory_bytes: int
    memory_bandwidth: float  # bytes/s
    l2_bytes: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    peak_flops: dict[str, float]  # dense tensor-core FLOP/s by compute dtype

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30

    def target_config(self) -> str:
        """XLA's `GpuTargetConfigProto` of this GPU, in protobuf text format."""
        major, minor = self.compute_capability
        return "\n".join(
            [
                "gpu_device_info {",
                "  threads_per_block_limit: 1024",
                "  threads_per_warp: 32",
                "  shared_memory_per_block: 49152",
                f"  shared_memory_per_core: {self.shared_memory_per_sm}",
                f"  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}",
                "  threads_per_core_limit: 2048",
                f"  core_count: {self.sm_count}",
                "  fpus_per_core: 128",
                "  block_dim_limit_x: 2147483647",
                "  block_dim_limit_y: 65535",
                "  block_dim_limit_z: 65535",
                f"  memory_bandwidth: {int(self.memory_bandwidth)}",
                f"  l2_cache_size: {self.l2_bytes}",
                f"  clock_rate_ghz: {self.clock_ghz}",
                f"  device_memory_size: {self.memory_bytes}",
                f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
                "  registers_per_core_limit: 65536",
                "  registers_per_block_limit: 65536",
                "}",
                'platform_name: "CUDA"',
                "dnn_version_info {{ major: {} minor: {} patch: {} }}".format(*CUDNN_VERSION),
                "runtime_version {{ major: {} minor: {} patch: {} }}".format(*CUDA_VERSION),
                f'device_description_str: "{self.device_kind}"',
            ]
        )


_H100 = GpuTarget(
    name="h100",
    device_kind="NVIDIA H100 80GB HBM3",
    compute_capability=(9, 0),
    sm_count=132,
    clock_ghz=1.98,
    memory_bytes=81559 * MIB,
    memory_bandwidth=3.35e12,
    l2_bytes=50 * MIB,
    shared_memory_per_sm=228 * 1024,
    shared_memory_per_block_optin=227 * 1024,
    peak_flops={"bfloat16": 989e12, "float32": 494e12},
)

TARGETS: dict[str, GpuTarget] = {
    "h100": _H100,
    # The H100's chip with more, faster memory.
    "h200": dataclasses.replace(
        _H100, name="h200", device_kind="NVIDIA H200", memory_bytes=143771 * MIB, memory_bandwidth=4.8e12
    ),
    "a100": GpuTarget(
        name="a100",
        device_kind="NVIDIA A100-SXM4-80GB",
        compute_capability=(8, 0),
        sm_count=108,
        clock_ghz=1.41,
        memory_bytes=81920 * MIB,
        memory_bandwidth=2.039e12,
        l2_bytes=40 * MIB,
        shared_memory_per_sm=164 * 1024,
        shared_memory_per_block_optin=163 * 1024,
        peak_flops={"bfloat16": 312e12, "float32": 156e12},
    ),
}


CUDA_EXTRA = "pip install 'es3-jax[cuda12]'"


def topology(target: GpuTarget, devices: int, hosts: int = 1) -> list:
    """`hosts` × `devices / hosts` GPUs of `target`, for compiling only (nothing runs on them)."""
    if not installed("jax_plugins.xla_cuda12"):
        raise Es3Error(f"compiling for {target.name} needs JAX's CUDA plugin (no GPU needed): {CUDA_EXTRA}")
    if devices < 1 or devices % hosts:
        raise Es3Error(f"{devices} devices do not split evenly over {hosts} hosts")
    # No driver to check the plugin against; the default backend stays the CPU's.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(
        platform="cuda", target_config=target.target_config(), topology=f"1x{hosts}x{devices // hosts}"
    )
    return list(topo.devices)
