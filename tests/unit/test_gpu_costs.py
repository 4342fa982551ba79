"""The prepared accelerator cost script runs end to end (here on the CPU, with a tiny model)."""

from __future__ import annotations

import json

import pytest

from atlas_rl import attention_backends as ab
from atlas_rl.attention_backends import DECODE_BACKENDS
from atlas_rl.bench.gpu_costs import SPEC_CONFIGS, TEMPERATURES, main


def test_gpu_cost_script_runs_tiny_on_cpu(tmp_path):
    argv = ["--out", str(tmp_path), "--tiny", "--device", "cpu", "--repeats", "2", "--new-tokens", "4"]
    assert main([*argv, "--spec-tokens", "6"]) == 0
    report = json.loads((tmp_path / "gpu_costs.json").read_text())
    tiny = report["shapes"]["tiny"]
    assert "errors" not in tiny and "skipped" not in tiny
    assert [(d["rows"], d["cudnn"]) for d in tiny["first"]] == [(1, False), (1, True)]
    assert all(d["first_step_ms"] > 0 and d["second_step_ms"] > 0 for d in tiny["first"])
    assert ab.DECODE_BACKENDS == DECODE_BACKENDS  # the section's swap of the dispatch is undone
    assert set(tiny["costs"]["forward_ms"]) == {f"{r}x{t}" for r in (1, 4) for t in (1, 2, 3)}
    assert all(v > 0 for v in tiny["costs"]["forward_ms"].values())
    assert all(v > 0 for v in tiny["costs"]["chain_ms"].values())
    assert [d["rows"] for d in tiny["decode"]] == [1, 4]
    assert all(d["engine_tok_s"] > 0 and d["hf_generate_tok_s"] > 0 for d in tiny["decode"])
    assert all(d["eager_tok_s"] > 0 and d["graphs"] is False for d in tiny["decode"])
    for temp in TEMPERATURES:
        for r in (1, 4):
            cell = tiny[f"spec_T{temp:g}_r{r}"]
            assert [(d["k"], d["graphs_requested"]) for d in cell] == list(SPEC_CONFIGS)
            assert not any(d["graphs"] for d in cell), "a CPU engine never replays graphs"
            for d in cell:
                assert (d["temperature"], d["rows"]) == (temp, r) and d["step_ms"] in d["step_ms_all"]
                assert d["step_ms"] >= d["forward_ms"] > 0
                assert (d["propose_ms"] > 0) == (d["k"] > 0)  # a plain step proposes nothing
                assert d["tau"] >= 1.0 if d["k"] else d["tau"] == 1.0
    for d in (d for cell in (tiny[k] for k in tiny if k.startswith("spec_")) for d in cell):
        assert d["timed_graph_counts"] == {"captures": 0, "replays": 0, "target_captures": 0}  # none on a CPU
    prof = tiny["profile"]
    assert set(prof) == {"k0", "k2"} and all(p["steps"] > 0 and p["ops_per_step"] > 0 for p in prof.values())
    assert prof["k2"]["ops_per_step"] > prof["k0"]["ops_per_step"]  # drafting and verifying drafts launch more
    assert all(p["by_host"][0]["self_cpu_ms"] >= p["by_host"][-1]["self_cpu_ms"] > 0 for p in prof.values())
    for c in tiny["outputs"]:  # no graphs on a CPU: every engine decodes the same tokens
        assert c["graphs_k2_vs_graphs_k0"] == [1.0, 1.0] and c["vs_eager_k0"]["eager_k2"] == [1.0, 1.0]
        assert c["graphs"]["graphs_k0"]["forward"] is None
    assert [c["rows"] for c in tiny["outputs"]] == [1, 3]
    (d,) = tiny["default"]
    assert len(d["k0_tok_s"]) == len(d["default_tok_s"]) == len(d["tau"]) == 2 and min(d["tau"]) >= 1.0
    assert len(d["every_step_tok_s"]) == len(d["upkeep_tok_s"]) == 2
    assert set(d["controller_us_per_step"]) == {"k0", "default", "every_step", "upkeep"}
    assert d["drafted_steps"]["k0"] == d["drafted_steps"]["upkeep"] == [0, 0]  # neither engine can draft
    md = (tmp_path / "gpu_costs.md").read_text()
    assert "| rows |" in md and "| T | k | graphs | rows | step |" in md and "| 1 | cuDNN left out |" in md
    assert "| 3 | 1.00 (1.00) | 1.00 (1.00) | 1.00 (1.00) |" in md and "default engine vs k=0" in md
    assert "| planning every step | upkeep only | controller µs/step (default) |" in md
    assert "profiled T=1 call at 4 rows" in md and "| op | calls | self host ms | device ms |" in md


def test_sections_past_the_deadline_are_skipped_and_said_so(tmp_path):
    assert main(["--out", str(tmp_path), "--tiny", "--device", "cpu", "--deadline-s", "1e-9"]) == 0
    tiny = json.loads((tmp_path / "gpu_costs.json").read_text())["shapes"]["tiny"]
    assert tiny["skipped"][:3] == ["first", "costs", "decode"] and len(tiny["skipped"]) == 6 + 2 * len(TEMPERATURES)
    assert tiny["skipped"][-2:] == ["outputs", "default"]
    assert "skipped at the deadline: first, costs, decode" in (tmp_path / "gpu_costs.md").read_text()


@pytest.mark.parametrize("bad", [["--repeats", "0"], ["--deadline-s", "0"], ["--shapes", "gpt-5"]])
def test_bad_options_are_refused_with_a_usage_error(tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path), "--tiny", *bad])
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err
