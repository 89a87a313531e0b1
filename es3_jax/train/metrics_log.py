"""Where a training run reports: `train.log` (human), `metrics.jsonl` (one record per logged step),
and `tensorboard/` scalars. Only process 0 writes; the others keep quiet.

On resume the JSON log is cut back to the restored step, so the log of a resumed run equals the
log of a run that was never interrupted.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import jax


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop records after `step` (written by a run that died before its next checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is unreliable
        if record.get("step", 0) > step:
            break
        kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class MetricsLog:
    """`log(step, {name: value})` writes one record everywhere; `close()` flushes."""

    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None):
        self.output_dir = Path(output_dir)
        self.active = jax.process_index() == 0
        self.logger = logging.getLogger("es3.train")
        self._tb = None
        self._jsonl = None
        if not self.active:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        # One run logs per process at a time: handlers an earlier, unclosed log left (a run that
        # failed in this process) would write into that run's train.log.
        self._remove_handlers()
        fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
        file_handler = logging.FileHandler(self.output_dir / "train.log")
        file_handler.setFormatter(fmt)
        self.logger.addHandler(file_handler)
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(fmt)
        console.setLevel(logging.WARNING)
        self.logger.addHandler(console)
        path = self.output_dir / "metrics.jsonl"
        if resume_step is None:
            path.unlink(missing_ok=True)
        else:
            _truncate_jsonl(path, resume_step)
        self._jsonl = path.open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter  # imports torch when it is installed

            self._tb = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=resume_step)

    def info(self, message: str) -> None:
        if self.active:
            self.logger.info(message)

    def warning(self, message: str) -> None:
        if self.active:
            self.logger.warning(message)

    def log(self, step: int, values: Mapping[str, float], *, prefix: str = "train") -> None:
        if not self.active:
            return
        values = {k: float(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": step, "split": prefix, **values}) + "\n")
        self._jsonl.flush()
        self.logger.info(f"{prefix} step {step}: " + " ".join(f"{k}={v:.5g}" for k, v in values.items()))
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        self._remove_handlers()

    def _remove_handlers(self) -> None:
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)
