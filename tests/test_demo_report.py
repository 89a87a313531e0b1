"""The demo's judgement of its figures, and the documents written from its summaries."""

from __future__ import annotations

import json
import re

import pytest

from es3_jax import demo, demo_report


def _summary(seed: int, student_jf: float, wall: float = 500.0, **changes) -> dict:
    figures = {
        "teacher_jf_vs_gt": 0.74,
        "teacher_mask_area_fraction": 0.13,
        "student_feature_mse_drop": 0.96,
        "student_jf_vs_teacher": student_jf,
        "student_jf_vs_gt": 0.73,
        "student_jf_vs_teacher_at_start": 0.2,
    }
    summary = {
        **figures,
        "seed": seed,
        "videos": 120,
        "finetune_steps": 600,
        "distill_steps": 1200,
        "commit": "abc1234",
        "machine": {"cpu": "Test CPU", "cores": 2, "devices": "1 cpu"},
        "date": "2026-12-07",
        "wall_time_s": wall,
        "peak_memory_gb": 3.2,
        "timings_s": {"generate_s": 30.0, "finetune_s": 200.0, "finetune_first_step_s": 41.0},
        **changes,
    }
    summary["judged"] = demo.judge(summary)
    summary["passed"] = all(r["met"] for r in summary["judged"])
    summary["verdict"] = demo.verdict(summary["judged"])
    return summary


def test_judge_measures_each_margin_and_names_what_falls_short():
    ok = _summary(0, 0.95)
    margins = {r["key"]: r["margin"] for r in ok["judged"]}
    assert margins["student_jf_vs_teacher"] == pytest.approx(0.05)
    assert margins["teacher_jf_vs_gt"] == pytest.approx(0.04)
    # A range's margin is the nearer bound's: 0.13 is 0.12 above 1 %.
    assert margins["teacher_mask_area_fraction"] == pytest.approx(0.12)
    assert ok["passed"] and ok["verdict"].startswith("PASSED") and "0.040" in ok["verdict"]

    short = _summary(1, 0.85, teacher_mask_area_fraction=0.7)
    failed = {r["key"] for r in short["judged"] if not r["met"]}
    assert failed == {"student_jf_vs_teacher", "teacher_mask_area_fraction"}
    assert "student J&F vs the teacher's masks 0.850" in short["verdict"]
    assert "teacher mask area" in short["verdict"] and "teacher J&F" not in short["verdict"]
    assert "not met" in demo.judgement_table(short)


def _document(tmp_path, body: str):
    path = tmp_path / "doc.md"
    path.write_text(body)
    return path


def test_report_rewrites_only_its_blocks_one_column_per_seed(tmp_path):
    runs = [_summary(0, 0.95, wall=512.0), _summary(1, 0.93, wall=530.0)]
    paths = [tmp_path / f"s{i}.json" for i in range(2)]
    for path, run in zip(paths, runs, strict=True):
        path.write_text(json.dumps(run))
    doc = _document(
        tmp_path,
        "intro\n<!-- demo:table -->\nold table\n<!-- /demo:table -->\nmiddle\n"
        "Timing: <!-- demo:time -->old<!-- /demo:time --> end\n",
    )
    written = demo_report.write([doc], demo_report.load_summaries(paths))
    assert written == [f"{doc}:table", f"{doc}:time"]
    text = doc.read_text()
    assert text.startswith("intro\n<!-- demo:table -->\n") and "\nmiddle\nTiming: <!-- demo:time -->" in text
    assert "old" not in text
    assert "| seed 0 | seed 1 |" in text
    assert "0.950 (+0.050)" in text and "0.930 (+0.030)" in text
    assert "commit abc1234" in text and "Test CPU (2 cores)" in text and "2026-12-07" in text
    assert "8:32 – 8:50 (2 seeds) on a 2-core Test CPU" in text and "3.2 GB" in text
    assert "(first step 41 s)" in text


def test_report_refuses_mixed_runs_and_documents_without_blocks(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_summary(0, 0.95)))
    b.write_text(json.dumps(_summary(1, 0.95, distill_steps=800)))
    with pytest.raises(demo_report.ReportError, match="differ in distill_steps"):
        demo_report.load_summaries([a, b])

    good = _document(tmp_path, "<!-- demo:time -->x<!-- /demo:time -->\n")
    bare = tmp_path / "bare.md"
    bare.write_text("no blocks here\n")
    with pytest.raises(demo_report.ReportError, match=re.escape(f"{bare}: no demo block")):
        demo_report.write([good, bare], demo_report.load_summaries([a]))
    assert good.read_text() == "<!-- demo:time -->x<!-- /demo:time -->\n", (
        "a document was written before all were checked"
    )

    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(demo_report.ReportError, match=r"broken\.json: not a readable"):
        demo_report.load_summaries([broken])
