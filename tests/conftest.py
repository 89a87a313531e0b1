"""Test-session set-up: 8 fake CPU devices, exact float32 matmuls, grain's absl flags."""

import json
import os
import sys
import tempfile
from pathlib import Path

from tests.flags import xla_flags

# Must precede the first JAX backend use anywhere in the session (tests/flags.py).
os.environ["XLA_FLAGS"] = xla_flags(devices=8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the session and the `es3` processes its tests start: tests build the
# same programs again and again (a fresh jit per test, per command run), and on a 2-core CPU
# compiling is most of their time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="es3-tests-xla-cache-"))
# Every program, not only those that took a second to compile: the small ones recur most.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# JAX's CUDA plugin, installed apart by the Makefile (tests/benchmarks compile for GPUs with it); on
# the path before JAX looks for plugins.
sys.path.append(str(Path(__file__).resolve().parents[1] / ".venv" / "cuda-plugin"))
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax

# Parity with PyTorch needs true float32 matmuls (XLA may use lower precision on GPUs).
jax.config.update("jax_default_matmul_precision", "highest")

try:
    from absl import flags  # grain reads absl flags even outside absl.app.run

    flags.FLAGS.mark_as_parsed()
except ImportError:
    pass


# Figures measured by `pytest -n` workers, gathered on the controlling process as each worker ends.
_WORKER_FIGURES: list[dict] = []


def _figures() -> list[dict]:
    module = sys.modules.get("tests.figures")  # imported by the tests that measure figures
    return getattr(module, "PARITY_FIGURES", []) + _WORKER_FIGURES


class _GatherWorkerFigures:
    """On the controller of a `pytest -n` run: the figures each worker measured."""

    def pytest_testnodedown(self, node, error):
        _WORKER_FIGURES.extend(json.loads(node.workeroutput.get("parity_figures", "[]")))


# `make test` hands each pytest worker whole files, the next file in collection order to the first
# worker free (pytest-xdist --dist loadfile --no-loadscope-reorder). These files take a minute or
# more each (measured on 2 CPU cores), longest first: started first, they leave the short files to
# even out the workers' ends, instead of one worker running a long file alone at the end.
LONG_FILES = (
    "tests/test_cpus.py",
    "tests/benchmarks/test_gpu_compile.py",
    "tests/predictor/test_video_predictor.py",
    "tests/porting/test_export.py",
    "tests/models/test_tracking.py",
    "tests/test_demo.py",
    "tests/test_track_cli.py",
    "tests/train/test_multiprocess.py",
    "tests/porting/test_stage1_checkpoint.py",
    "tests/train/test_step.py",
    "tests/train/test_amp.py",
    "tests/deploy/test_onnx.py",
)


def pytest_collection_modifyitems(items):
    rank = {path: i for i, path in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(LONG_FILES)))


def pytest_configure(config):
    # Registered only where xdist is loaded: without it pytest rejects its hook as unknown.
    if config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_GatherWorkerFigures())


def pytest_terminal_summary(terminalreporter):
    """List every parity figure the run measured against the upstream implementations."""
    figures = sorted(_figures(), key=lambda f: f["test"])  # workers finish in any order
    if not figures:
        return
    terminalreporter.section("parity against upstream (relative error = max|ours - ref| / max|ref|)")
    for f in figures:
        mark = "ok" if f["error"] <= f["tolerance"] else "FAIL"
        terminalreporter.write_line(f"{f['error']:.2e}  (<= {f['tolerance']:.0e} {mark})  {f['name']}")


def pytest_sessionfinish(session, exitstatus):
    """A worker hands its figures to the controller; the controller (or a plain run) writes them as
    JSON lines where ES3_PARITY_FIGURES says (the parity sweep reads them)."""
    if hasattr(session.config, "workerinput"):
        session.config.workeroutput["parity_figures"] = json.dumps(_figures())
        return
    path = os.environ.get("ES3_PARITY_FIGURES")
    if path:
        Path(path).write_text("".join(json.dumps(f) + "\n" for f in _figures()))
