"""What importing es3 costs: `es3 --help` loads no jax, and the library loads no torch."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("jax", "flax", "orbax", "tensorstore", "grain", "torch")


def _loaded(code: str) -> list[str]:
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    return [m for m in json.loads(out.stdout.strip().splitlines()[-1]) if m in HEAVY]


def test_help_builds_every_parser_without_jax():
    assert _loaded("from es3_jax.cli import build_parser; build_parser()") == []


def test_the_library_never_loads_torch():
    code = "import es3_jax.weights, es3_jax.train.trainer, es3_jax.predictor.video_predictor, es3_jax.embed, es3_jax.demo"
    assert "torch" not in _loaded(code)
