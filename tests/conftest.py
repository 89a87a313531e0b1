"""Test-session set-up: 8 fake CPU devices, exact float32 matmuls, grain's absl flags."""

import os

# Must precede the first JAX backend use anywhere in the session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

# Parity with PyTorch needs true float32 matmuls (XLA may use lower precision on GPUs).
jax.config.update("jax_default_matmul_precision", "highest")

try:
    from absl import flags  # grain reads absl flags even outside absl.app.run

    flags.FLAGS.mark_as_parsed()
except ImportError:
    pass


def pytest_terminal_summary(terminalreporter):
    """List every parity figure the run measured against the upstream implementations."""
    import sys

    module = sys.modules.get("tests.upstream")
    figures = getattr(module, "PARITY_FIGURES", [])
    if not figures:
        return
    terminalreporter.section("parity against upstream (relative error = max|ours - ref| / max|ref|)")
    for name, err, tol in figures:
        mark = "ok" if err <= tol else "FAIL"
        terminalreporter.write_line(f"{err:.2e}  (<= {tol:.0e} {mark})  {name}")
