"""The suite's numerics on the processors users have, not only on the one running it.

The tests marked `numerics` (one quantity evaluated twice in differently shaped, batched or fused
programs, which round alike only if their sums run in the same order) run again in a process shown
an AVX2 processor without AVX-512, what most servers and laptops have (`tests/emulated_cpu.py`).
Emulated, a test runs 10-20 times slower, so the suite runs those of the files below, the memory
attention's padded bank and the RoPE angles (about 2.5 CPU-minutes together); the perceiver, pooling,
train-step and tracking ones take about 40 CPU-minutes and are swept with
`make parity-sweep MARKER=numerics ISA=avx2`. Tests of several processes are not among them: the
processes they start would run natively.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from tests import emulated_cpu

REPO = Path(__file__).resolve().parents[1]
IN_THE_SUITE = ("tests/memory/test_attention.py", "tests/nn/test_rope.py")


def test_numerics_hold_on_an_avx2_processor(tmp_path):
    if "avx512f" not in emulated_cpu.cpu_flags():
        pytest.skip("this processor has no AVX-512: the suite's own run is already an AVX2 run")
    reason = emulated_cpu.unavailable("avx2")
    if reason:
        pytest.skip(f"the numerics ran on this processor's kernels only: {reason}")
    argv = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "numerics and not slow"]
    argv += IN_THE_SUITE
    proc = subprocess.run(
        emulated_cpu.command("avx2", argv),
        cwd=REPO,
        env=emulated_cpu.environment("avx2", tmp_path / "xla"),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    output = emulated_cpu.QEMU_WARNING.sub("", proc.stdout + proc.stderr)
    print(output[-6000:])
    model = emulated_cpu.MODELS["avx2"]
    assert proc.returncode == 0, (
        f"the numerics tests fail on an emulated {model} (AVX2, no AVX-512), exit {proc.returncode}:\n"
        + output[-4000:]
    )
