"""The GPU projection: τ measured here times the device's step ratio, and its inputs checked."""

from __future__ import annotations

import json

import pytest

from atlas_rl.bench.gpu_projection import main, project_shape, render_projection


def _step(k: int, temp: float, rows: int, step: float, propose: float = 0.0) -> dict:
    return {"k": k, "temperature": temp, "rows": rows, "step_ms": step, "propose_ms": propose}


TABLE = {"speculators": ["suffix", "static"], "prompts": 4, "new_tokens": 8, "cells": []}
TABLE["cells"] = [{"temperature": t, "k": k, "tau": 1.0 + 0.4 * k / (1 + t)} for t in (0.0, 1.0) for k in (2, 4)]
ENTRY = {
    "shape": ["llama"],
    "costs": {"forward_ms": {"1x1": 10.0, "1x3": 11.0, "1x5": 12.5}, "chain_ms": {}},
    "spec_T0_r1": [_step(0, 0.0, 1, 12.0), _step(2, 0.0, 1, 16.0, 3.0), _step(4, 0.0, 1, 20.0, 5.0)],
    "spec_T1_r4": [_step(0, 1.0, 4, 13.0), _step(2, 1.0, 4, 26.0, 4.0)],
}


def test_speed_up_is_tau_times_the_plain_step_over_the_speculating_step():
    lines = {(p["temperature"], p["rows"], p["k"]): p for p in project_shape(ENTRY, TABLE)}
    assert set(lines) == {(0.0, 1, 2), (0.0, 1, 4), (1.0, 4, 2)}  # k=0 is the reference, not a line
    p = lines[(0.0, 1, 2)]
    assert p["tau"] == pytest.approx(1.8) and p["speedup"] == pytest.approx(1.8 * 12.0 / 16.0)
    assert p["speedup_forward_only"] == pytest.approx(1.8 * 10.0 / 11.0) and p["draft_share"] == pytest.approx(3 / 16)
    assert lines[(0.0, 1, 4)]["speedup_forward_only"] == pytest.approx(2.6 * 10.0 / 12.5)
    assert (
        lines[(1.0, 4, 2)]["speedup"] == pytest.approx(1.4 * 0.5)
        and lines[(1.0, 4, 2)]["speedup_forward_only"] is None
    )


def test_projection_cli_writes_markdown_and_refuses_missing_inputs(tmp_path, capsys):
    costs = {"device": "H200", "dtype": "torch.bfloat16", "shapes": {"x": ENTRY}}
    (tmp_path / "c.json").write_text(json.dumps(costs))
    (tmp_path / "t.json").write_text(json.dumps(TABLE))
    out = tmp_path / "p.md"
    assert (
        main(["project", "--costs", str(tmp_path / "c.json"), "--tau", str(tmp_path / "t.json"), "--out", str(out)])
        == 0
    )
    assert out.read_text() == render_projection(costs, TABLE) and "**1.35x**" in out.read_text()
    with pytest.raises(SystemExit) as exc:
        main(["project", "--costs", str(tmp_path / "nope.json"), "--tau", str(tmp_path / "t.json"), "--out", str(out)])
    assert exc.value.code == 2 and "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--prompts", "0"], ["--ks", "2,x"], ["--ks", "0"]])
def test_tau_refuses_bad_options(tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tau", "--out", str(tmp_path / "t.json"), *bad])
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


def test_tau_measures_each_temperature_and_draft_length_on_the_embedded_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "t.json"
    assert main(["tau", "--out", str(out), "--prompts", "2", "--new-tokens", "6", "--ks", "1,3"]) == 0
    table = json.loads(out.read_text())
    assert [(c["temperature"], c["k"]) for c in table["cells"]] == [(0.0, 1), (0.0, 3), (1.0, 1), (1.0, 3)]
    assert all(1.0 <= c["tau"] <= c["k"] + 1 for c in table["cells"]) and table["prompts"] == 2


def test_runs_pair_with_the_plain_run_of_their_graph_setting():
    def run(k, step, graphs):
        return {**_step(k, 0.0, 1, step, 1.0 if k else 0.0), "graphs_requested": graphs, "graphs": graphs}

    entry = {"spec_T0_r1": [run(0, 5.0, True), run(2, 6.0, True), run(0, 15.0, False), run(2, 18.0, False)]}
    lines = {(p["k"], p["graphs"]): p for p in project_shape(entry, TABLE)}
    assert set(lines) == {(2, True), (2, False)}
    assert lines[(2, True)]["step_ratio"] == pytest.approx(6.0 / 5.0)
    assert lines[(2, False)]["step_ratio"] == pytest.approx(18.0 / 15.0)
    failed = {**run(0, 15.5, True), "graphs": False}  # graphs asked for, capture failed: eager, not comparable
    entry = {"spec_T0_r1": [failed, run(2, 6.0, True), run(0, 15.0, False), run(2, 18.0, False)]}
    assert {(p["k"], p["graphs"]) for p in project_shape(entry, TABLE)} == {(2, False)}
