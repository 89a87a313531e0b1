"""The demo's figures in the project's documents, written from runs' `summary.json` files.

A document holds named blocks between markers, rewritten in place and nothing else of it:

    <!-- demo:table -->  ...  <!-- /demo:table -->     every run's judged figures, one column per seed
    <!-- demo:time -->   ...  <!-- /demo:time -->      one sentence: how long the demo takes, and where

Every figure states the date, the commit and the machine of its runs, so none can outlive them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from es3_jax.demo import FIGURES
from es3_jax.errors import Es3Error
from es3_jax.progress import clock

BLOCK = re.compile(r"(<!-- demo:(?P<name>[\w-]+) -->\n?)(?P<body>.*?)(<!-- /demo:(?P=name) -->)", re.DOTALL)
# What must agree between the runs of one report: it describes one setting on one machine.
SAME = ("videos", "finetune_steps", "distill_steps", "commit", "machine")


class ReportError(Es3Error):
    """A summary or a document the report cannot use."""


def load_summaries(paths: Sequence[str | Path]) -> list[dict]:
    """The summaries at `paths`, checked to be of one setting, commit and machine."""
    runs = []
    for path in paths:
        try:
            runs.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ReportError(f"{path}: not a readable demo summary.json ({e})") from e
        missing = [k for k in (*SAME, "judged", "seed", "wall_time_s", "date") if k not in runs[-1]]
        if missing:
            raise ReportError(f"{path}: a summary.json without {missing} (written by an older es3 demo?)")
    for key in SAME:
        values = {json.dumps(r[key], sort_keys=True) for r in runs}
        if len(values) > 1:
            raise ReportError(
                f"the runs differ in {key} ({', '.join(sorted(values))}): a report is of one setting"
            )
    return runs


def _machine(run: dict) -> str:
    m = run["machine"]
    return f"{m['cpu']} ({m['cores']} cores)"


def _provenance(runs: list[dict]) -> str:
    first = runs[0]
    dates = sorted({r["date"] for r in runs})
    return (
        f"{' – '.join([dates[0], dates[-1]] if len(dates) > 1 else dates)}, commit {first['commit'] or 'unknown'}, "
        f"{_machine(first)}: {first['videos']} videos, fine-tuning {first['finetune_steps']} steps, "
        f"distillation {first['distill_steps']} steps"
    )


def table(runs: list[dict]) -> str:
    """Markdown: every target and figure of every run, margins beside the targets."""
    head = ["figure", "target", *(f"seed {r['seed']}" for r in runs)]
    rows = [head, ["---"] * len(head)]
    for i, target in enumerate(runs[0]["judged"]):
        cells = []
        for r in runs:
            j = r["judged"][i]
            cells.append(f"{j['measured']:.3f} ({j['margin']:+.3f})" + ("" if j["met"] else " **not met**"))
        rows.append([target["figure"], target["target"], *cells])
    for key, label in FIGURES:
        rows.append([label, "", *(f"{r[key]:.3f}" for r in runs)])
    rows.append(["wall time", "", *(clock(r["wall_time_s"]) for r in runs)])
    phases = [k for k in runs[0]["timings_s"] if not k.endswith("_first_step_s")]
    for phase in phases:
        first = f"{phase[:-2]}_first_step_s"
        cells = []
        for r in runs:
            t = r["timings_s"]
            cells.append(f"{t[phase]:.0f} s" + (f" (first step {t[first]:.0f} s)" if first in t else ""))
        rows.append([f"· {phase[:-2]}", "", *cells])
    rows.append(["peak memory", "", *(f"{r['peak_memory_gb']:.1f} GB" for r in runs)])
    rows.append(["verdict", "", *("passed" if r["passed"] else "**failed**" for r in runs)])
    lines = [f"`es3 demo --seed N`, {_provenance(runs)}. Margins in brackets.", ""]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def time_sentence(runs: list[dict]) -> str:
    """How long the demo takes, on what, and when it was measured."""
    walls = sorted(r["wall_time_s"] for r in runs)
    span = clock(walls[0]) if len(walls) == 1 else f"{clock(walls[0])} – {clock(walls[-1])}"
    seeds = "one run" if len(runs) == 1 else f"{len(runs)} seeds"
    peak = max(r["peak_memory_gb"] for r in runs)
    return (
        f"`make demo` takes {span} ({seeds}) on a {runs[0]['machine']['cores']}-core "
        f"{runs[0]['machine']['cpu']}, set-up excluded, with a peak of "
        f"{peak:.1f} GB of memory (measured {max(r['date'] for r in runs)}, commit {runs[0]['commit'] or 'unknown'}).\n"
    )


BLOCKS: dict[str, Callable[[list[dict]], str]] = {"table": table, "time": time_sentence}


def write(documents: Sequence[str | Path], runs: list[dict]) -> list[str]:
    """Rewrite the demo blocks of each document from `runs` -> the blocks written, as `path:name`."""
    written = []
    updates = {}
    for doc in documents:
        path = Path(doc)
        try:
            text = path.read_text()
        except OSError as e:
            raise ReportError(f"{path}: cannot read it ({e})") from e
        names = [m.group("name") for m in BLOCK.finditer(text)]
        unknown = sorted(set(names) - set(BLOCKS))
        if not names or unknown:
            raise ReportError(
                f"{path}: {'unknown demo blocks ' + str(unknown) if unknown else 'no demo block'}; "
                f"a block is <!-- demo:NAME --> ... <!-- /demo:NAME -->, NAME one of {sorted(BLOCKS)}"
            )
        updates[path] = BLOCK.sub(lambda m: m.group(1) + BLOCKS[m.group("name")](runs) + m.group(4), text)
        written += [f"{path}:{n}" for n in names]
    # Every document is checked before any is written.
    for path, text in updates.items():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return written
