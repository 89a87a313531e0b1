"""Running a test process as another x86-64 processor would: qemu's user-mode emulator reports the
processor model's features, and XLA:CPU's run-time kernel choice (its dot products and convolutions)
follows them.

XLA picks those kernels from the processor's features as it runs (AVX-512 on this kind of server,
AVX2 and FMA on most others and on laptops), and other kernels sum in other orders.
`--xla_cpu_max_isa` narrows only the code XLA generates itself, not those kernels, so on an AVX-512
machine it leaves their sums as they were; an emulated processor changes both. Processes that an
emulated process starts run natively (qemu-user follows no `exec`).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
from pathlib import Path

from tests.flags import xla_flags

# `make parity-sweep ISA=...` and the suite's second run: the instruction set, and qemu's model of a
# processor that has it and nothing newer (AMD EPYC Rome: AVX2 and FMA, no AVX-512). jaxlib itself
# needs AVX, so nothing older runs it.
MODELS = {"avx2": "EPYC-Rome"}
# What qemu prints once per feature of the model its emulator lacks (none of them arithmetic).
QEMU_WARNING = re.compile(r"^qemu-x86_64: warning: .*\n", re.MULTILINE)


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def unavailable(isa: str) -> str | None:
    """Why this machine cannot run a process as an `isa` processor; None when it can."""
    if isa not in MODELS:
        return f"no emulated processor for ISA {isa!r}; known: {', '.join(MODELS)}"
    if platform.machine() != "x86_64":
        return f"an {platform.machine()} machine cannot emulate an x86-64 processor for JAX here"
    if shutil.which("qemu-x86_64") is None:
        return (
            "qemu-x86_64 not found: install Debian's qemu-user (make test does, where it runs as root "
            "on Debian or Ubuntu) to run the tests as an AVX2 processor would"
        )
    return None


def command(isa: str, argv: list[str]) -> list[str]:
    """`argv` run under the emulator as an `isa` processor."""
    return ["qemu-x86_64", "-cpu", MODELS[isa], *argv]


def environment(isa: str, cache_dir: Path) -> dict[str, str]:
    """The test environment of an emulated process: the suite's XLA flags limited to `isa`, and a
    compilation cache of its own (programs compiled natively may hold instructions it lacks)."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"{xla_flags(devices=8)} --xla_cpu_max_isa={isa.upper()}",
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PYTEST_XDIST_WORKER", None)
    return env
