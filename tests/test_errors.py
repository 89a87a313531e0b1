"""`es3_jax.errors`: without torch, every way into a PyTorch file is one Es3Error naming the extra."""

import subprocess
import sys
from pathlib import Path

from es3_jax.errors import TORCH_EXTRA

REPO = Path(__file__).resolve().parents[1]

# Runs es3 as if torch were not installed: `sys.modules["torch"] = None` makes both `import torch` and
# `importlib.util.find_spec("torch")` report it missing.
_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None
from es3_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _es3_without_torch(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, *argv], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_pytorch_files_without_torch_name_the_extra(tmp_path):
    checkpoint = tmp_path / "sam3.pt"
    checkpoint.write_bytes(b"not read: torch is missing")
    port = ["port", "--sam3_weights", str(checkpoint), "--output_dir", str(tmp_path / "out")]
    export = ["export", "--stage2_weights", str(tmp_path), "--sam3_weights", str(checkpoint),
              "--output_path", str(tmp_path / "merged.pt")]  # fmt: skip
    runs = {"port": _es3_without_torch(*port), "export": _es3_without_torch(*export)}
    for command, run in runs.items():
        assert run.returncode == 2, f"es3 {command}: exit {run.returncode}\n{run.stderr[-2000:]}"
        assert f"es3 {command}: error:" in run.stderr and TORCH_EXTRA in run.stderr, run.stderr[-2000:]
        assert "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "sam3.pt: reading a PyTorch checkpoint needs torch" in runs["port"].stderr
