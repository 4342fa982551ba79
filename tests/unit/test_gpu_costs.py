"""The prepared accelerator cost script runs end to end (here on the CPU, with a tiny model)."""

from __future__ import annotations

import json

from atlas_rl.bench.gpu_costs import main


def test_gpu_cost_script_runs_tiny_on_cpu(tmp_path):
    assert main(["--out", str(tmp_path), "--tiny", "--device", "cpu", "--repeats", "1", "--new-tokens", "4"]) == 0
    report = json.loads((tmp_path / "gpu_costs.json").read_text())
    tiny = report["shapes"]["tiny"]
    assert set(tiny["forward_ms"]) == {f"{r}x{t}" for r in (1, 4) for t in (1, 2, 3)}
    assert all(v > 0 for v in tiny["forward_ms"].values()) and all(v > 0 for v in tiny["chain_ms"].values())
    assert [d["rows"] for d in tiny["decode"]] == [1, 4]
    assert all(d["engine_tok_s"] > 0 and d["hf_generate_tok_s"] > 0 for d in tiny["decode"])
    assert "| rows |" in (tmp_path / "gpu_costs.md").read_text()
