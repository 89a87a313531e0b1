"""Run the parity tests over many fresh seeds and report, per test, the worst figure against its
tolerance: a tolerance that holds for every seed is the only kind a test suite can rely on.

    python -m tests.parity_sweep --seeds 20 --workers 2 --output sweep.md   # or: make parity-sweep
    python -m tests.parity_sweep --seeds 20 --isa avx2 -m numerics          # or: make parity-sweep ISA=avx2

`--isa avx2` runs each pytest process as an AVX2 processor without AVX-512 would (emulated:
`tests/emulated_cpu.py`), where XLA's kernels sum in other orders than on this one.

Each run is a separate pytest process (`-m parity`, weights and inputs drawn fresh), writing the
figures it measured to a JSON-lines file (`ES3_PARITY_FIGURES`); after the first, runs select
only the tests that measured figures. A run that fails is listed with
its seed line, so `ES3_TEST_SEED=<seed>` replays it. Not part of `make test`: 20 runs take hours
on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests import emulated_cpu

REPO = Path(__file__).resolve().parents[1]


def run_once(
    index: int, folder: Path, selection: list[str], workers: int, marker: str, isa: str = "native"
) -> dict:
    """One pytest run of the tests marked `marker` -> {"returncode", "seeds", "figures", "seconds",
    "tail"}, also kept as `folder/run_<index>.json`; `isa` other than "native" runs it emulated."""
    figures = folder / f"run_{index}.jsonl"
    # Every run compiles the same programs (fresh weights, same shapes): one cache serves them all.
    cache = folder / "xla"
    if isa == "native":
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)}
    else:
        env = emulated_cpu.environment(isa, cache)
    env["ES3_PARITY_FIGURES"] = str(figures)
    env.pop("ES3_TEST_SEED", None)
    parallel = ["-n", str(workers), "--dist", "loadfile"] if workers > 1 else []
    argv = [sys.executable, "-m", "pytest", "-q", "-s", "-m", marker, "-p", "no:cacheprovider"]
    argv += [*parallel, *selection]
    start = time.perf_counter()
    proc = subprocess.run(
        argv if isa == "native" else emulated_cpu.command(isa, argv),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    records = [json.loads(line) for line in figures.read_text().splitlines()] if figures.exists() else []
    run = {
        "returncode": proc.returncode,
        # Under -n a worker's output shows only in a failure's report, which is where it is needed.
        "seeds": sorted(set(re.findall(r"\[es3 test seed (\d+)\]", proc.stdout))),
        "figures": records,
        "seconds": time.perf_counter() - start,
        "tail": proc.stdout[-3000:] if proc.returncode else "",
    }
    (folder / f"run_{index}.json").write_text(json.dumps(run))
    return run


def earlier_runs(folder: Path) -> list[dict]:
    """The runs a previous sweep into the same folder completed, in order."""
    done = []
    while (folder / f"run_{len(done)}.json").exists():
        done.append(json.loads((folder / f"run_{len(done)}.json").read_text()))
    return done


def worst_per_test(runs: list[dict]) -> list[dict]:
    """Per test: the figure whose error is the largest share of its tolerance, over every run."""
    worst: dict[str, dict] = {}
    for r, run in enumerate(runs):
        for f in run["figures"]:
            ratio = (
                f["error"] / f["tolerance"]
                if f["tolerance"] > 0
                else (0.0 if f["error"] == 0 else float("inf"))
            )
            best = worst.get(f["test"])
            if best is None or ratio > best["ratio"]:
                worst[f["test"]] = {**f, "ratio": ratio, "run": r}
    return [worst[t] for t in sorted(worst)]


def table(rows: list[dict], runs: list[dict], marker: str = "parity", isa: str = "native") -> str:
    failed = [r for r in runs if r["returncode"] != 0]
    where = "this processor" if isa == "native" else f"an emulated {emulated_cpu.MODELS[isa]} ({isa})"
    lines = [
        f"{len(runs)} runs of `pytest -m {marker}` on {where}, fresh seeds; {len(failed)} failed; "
        f"{sum(r['seconds'] for r in runs) / 60:.0f} min in all.",
        "",
        "| test | worst figure | worst error | tolerance | error / tolerance |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['test']} | {row['name']} | {row['error']:.2e} | {row['tolerance']:.0e} | {row['ratio']:.3f} |"
        )
    for r in failed:
        lines += ["", f"failed run (seeds {', '.join(r['seeds'])}):", "```", r["tail"], "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=20, help="number of pytest runs, each with fresh seeds")
    p.add_argument(
        "--output", default=None, help="also write the table (markdown) to this file, after each run"
    )
    p.add_argument("--workers", type=int, default=1, help="pytest processes per run (pytest-xdist)")
    p.add_argument(
        "--folder",
        default=None,
        help="keep each run here; a sweep into the same folder goes on from its last run",
    )
    p.add_argument("-m", dest="marker", default="parity", help="the tests to sweep, by pytest marker")
    p.add_argument(
        "--isa",
        default="native",
        choices=["native", *emulated_cpu.MODELS],
        help="run as this processor, or as an emulated one with only this instruction set",
    )
    p.add_argument("pytest_args", nargs="*", help="pytest's selection, e.g. a test path")
    args = p.parse_args(argv)
    if args.isa != "native" and (reason := emulated_cpu.unavailable(args.isa)):
        p.error(reason)
    with contextlib.ExitStack() as stack:
        folder = Path(args.folder or stack.enter_context(tempfile.TemporaryDirectory()))
        folder.mkdir(parents=True, exist_ok=True)
        runs = earlier_runs(folder)
        selection = list(args.pytest_args)
        for i in range(len(runs), args.seeds):
            if runs:
                # Later runs need only the tests that measure figures (the others draw no seed).
                selection = sorted({f["test"] for f in runs[0]["figures"]}) or selection
            runs.append(run_once(i, folder, selection, args.workers, args.marker, args.isa))
            run = runs[-1]
            status = "ok" if run["returncode"] == 0 else f"FAILED ({run['returncode']})"
            print(
                f"run {i + 1}/{args.seeds}: {status}, {len(run['figures'])} figures, {run['seconds']:.0f} s",
                flush=True,
            )
            if args.output:
                # Rewritten after every run, so an interrupted sweep still leaves its table.
                Path(args.output).write_text(table(worst_per_test(runs), runs, args.marker, args.isa) + "\n")
    print(table(worst_per_test(runs), runs, args.marker, args.isa))
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
