"""The multi-seed GRPO A/B comparison reads run directories and computes the ratios and tests it reports."""

from __future__ import annotations

import json

import pytest

from atlas_rl.bench.grpo_ab import compare, load_run, main


def _run(d, backend, rollout_s, tok_s, rewards, step_s=100.0):
    d.mkdir(parents=True)
    lines = [
        {
            "step": i + 1,
            "loss": 0.0,
            "reward": r,
            "entropy": 2.0,
            "completions/mean_length": 100.0,
            "atlas/rollout_s": rollout_s,
            "atlas/rollout_tokens_per_s": tok_s,
            "step_time": step_s,
        }
        for i, r in enumerate(rewards)
    ]
    lines.insert(1, {"step": 1, "train_runtime": 5.0})  # a line without a loss is not a step
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (d / "run.json").write_text(json.dumps({"generation_backend": backend}))
    return d


def test_ratios_and_reward_test(tmp_path, capsys):
    a = [_run(tmp_path / f"a{s}", "atlas", 50.0, 120.0, [0.1 + 0.01 * s] * 3) for s in range(3)]
    b = [_run(tmp_path / f"b{s}", "transformers", 100.0, 80.0, [0.05 - 0.01 * s] * 3, 150.0) for s in range(3)]
    runs_a, runs_b = [load_run(d) for d in a], [load_run(d) for d in b]
    assert runs_a[0]["n"] == 3
    text = compare(runs_a, runs_b, "atlas", "transformers")
    assert "| **all** | **2.00** | **1.50** | **1.50** |" in text
    row = next(line for line in text.splitlines() if line.startswith("| reward |"))
    p = float(row.rsplit("|", 2)[1])
    assert p < 0.05  # rewards 0.10/0.11/0.12 vs 0.05/0.04/0.03 differ
    assert main(["--a", *map(str, a), "--b", *map(str, b)]) == 0
    assert "atlas vs transformers: 3 vs 3 seeds" in capsys.readouterr().out


def test_missing_run_directory_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--a", str(tmp_path / "nope"), "--b", str(tmp_path / "nope")])
    assert "nope does not exist" in capsys.readouterr().err
