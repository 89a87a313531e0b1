"""XLA settings the test session and the processes it starts share."""

import os

# Compiling is most of the suite's time on a CPU and the tests' programs are small, so both settings
# give up run time the tests barely spend for compile time: LLVM optimisation level 0, and XLA:CPU's
# loop emitters instead of its MLIR fusion emitters. A micro distillation step compiled in a fresh
# process: 31 s at the defaults, 20 s at level 0, 10-12 s with both; the random initialisation
# before it (an eager compilation per op) 23 s, 15 s, 8-10 s; the step's loss the same to the last
# digit in all three.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def _name(flag: str) -> str:
    return flag.split("=", 1)[0]


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test process: `devices` fake CPU devices (None: XLA's one), FAST_COMPILE, and
    the flags the person running the tests set in XLA_FLAGS (`XLA_FLAGS=--xla_cpu_max_isa=AVX2 make
    test`), which come last and so win where they set the same flag. The device count is each
    process's own, never inherited."""
    fast = FAST_COMPILE.split()
    given = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in fast and _name(f) != _DEVICE_COUNT]
    count = [f"{_DEVICE_COUNT}={devices}"] if devices else []
    return " ".join([*count, *fast, *given])
