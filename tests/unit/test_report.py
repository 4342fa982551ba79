"""The run report: the paired speed-up (interleaved halves, disturbed steps flagged and left out, a confidence
interval of the median), where the rollout time went, and the rollout traces."""

from __future__ import annotations

import json
import math

import pytest

from atlas_rl.metrics.report import load_run, median_ci, render_markdown, summarize, write_report
from atlas_rl.trainers.backend import paired_speedup


def test_median_ci_covers_at_least_the_level_with_order_statistics():
    lo, hi, cov = median_ci([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    # n = 8: (x_(2), x_(7)) covers the median with probability 1 - 2 * 9/256 = 0.93 >= 0.9; (x_(3), x_(6)) only 0.71
    assert (lo, hi) == (2.0, 7.0) and cov == pytest.approx(1 - 18 / 256)
    assert all(math.isnan(v) for v in median_ci([1.0]))


def test_paired_speedup_flags_a_starved_or_inconsistent_half():
    clean = paired_speedup([("atlas", 100, 1.0, 1.0), ("baseline", 100, 2.0, 2.0),
                            ("baseline", 100, 2.0, 2.0), ("atlas", 100, 1.0, 1.0)])  # fmt: skip
    assert clean["speedup"] == pytest.approx(2.0) and clean["disturbed"] == 0.0
    # another process took the core during one baseline half: its CPU share of wall time halves
    starved = paired_speedup([("atlas", 100, 1.0, 1.0), ("baseline", 100, 4.0, 2.0),
                              ("baseline", 100, 2.0, 2.0), ("atlas", 100, 1.0, 1.0)])  # fmt: skip
    assert starved["disturbed"] == 1.0 and starved["half_spread"] == pytest.approx(2.0)


def _write_run(d, speedups, disturbed):
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"name": "r"}))
    with open(d / "metrics.jsonl", "w") as f:
        for i, (s, dist) in enumerate(zip(speedups, disturbed), 1):
            rec = {"step": i, "loss": 0.0, "reward": 0.1 * i, "rewards/correct/mean": 0.05 * i,
                   "atlas/speedup": s, "atlas/speedup_disturbed": dist, "atlas/rollout_s": 2.0,
                   "atlas/rollout_forward_s": 1.5, "atlas/rollout_tokens_per_s": 10.0}  # fmt: skip
            f.write(json.dumps(rec) + "\n")
    (d / "rollouts.jsonl").write_text(
        json.dumps({"step": 1, "rows": [4, 4, 2, 1], "query_len": [1, 1, 3, 5]}) + "\n" + '{"step": 2, "ro'
    )  # the second line was cut short: the report still renders


def test_disturbed_steps_leave_the_headline_and_raise_a_warning(tmp_path):
    d = tmp_path / "run"
    _write_run(d, [1.0, 1.1, 5.5, 0.9, 1.05], [0, 0, 1, 0, 0])
    summary = summarize(load_run(d))
    h = summary["headline"]
    assert h["speedup"] == pytest.approx(1.025) and h["speedup_disturbed_steps"] == "3"
    assert "CI of the median, 4 steps" in h["speedup_ci"]
    assert "Warning" in render_markdown(summary) and "step(s) 3" in render_markdown(summary)
    paths = write_report(d)
    page = paths["html"].read_text()
    assert 'class="warning"' in page and page.count('class="plot"') == 7
    assert summary["traces"] == {"1": {"rows": [4, 4, 2, 1], "query_len": [1, 1, 3, 5], "segments": [4]}}
    assert summary["series"]["rewards/correct/mean"] == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.25])


def test_trace_without_segments_splits_where_a_new_engine_call_starts():
    from atlas_rl.metrics.runlog import _restarts

    assert _restarts([8, 8, 7, 3, 1, 8, 8, 2]) == [5, 3]  # two halves: rows never grow within one call
    assert _restarts([4, 4, 2, 1]) == [4] and _restarts([]) == []
