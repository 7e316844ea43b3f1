"""The loop study on the default backend: QE fails some first attempts of the embedded engine and the
scripted policy's refinement, built from the review's fixes, raises their score (a small seeded run)."""

from __future__ import annotations

import io

from evals.loop_study import per_family_table, run_condition

#: Types whose seeded first attempt (seeds as in the full study) QE fails.
PAIRS = [("bottle", "contamination"), ("capsule", "faulty_imprint"), ("screw", "thread_top"), ("capsule", "squeeze")]


def test_default_backend_refinements_raise_the_score(tmp_path) -> None:
    rows = run_condition("default", PAIRS, size=256, per_type=1, work=tmp_path)
    assert len(rows) == len(PAIRS)
    refined = [r for r in rows if r["attempts"] > 1]
    assert refined, "no first attempt failed QE"
    for r in refined:
        assert not r["open_pass"] and r["fixes"][0], r  # the loop acted on a failed verdict that named fixes
    raised = [r for r in refined if r["last"] > r["first"]]
    assert raised, [(r["anomaly_type"], r["first"], r["last"]) for r in refined]
    out = io.StringIO()
    table = per_family_table(rows, out)
    assert sum(e["raised"] for e in table.values()) == len(raised)
    assert "first failed" in out.getvalue()
