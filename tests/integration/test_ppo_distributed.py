"""PPO with 2 CPU processes under `accelerate launch` (slow): DDP over gloo keeps policy, value model and adaptive
speculator identical on both ranks; the PPO recipe runs under DeepSpeed ZeRO-2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _launch(config: str, script: list[str], port: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "recipes" / "accelerate" / config),
    ]
    cmd += ["--main_process_port", str(port), *script]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_two_process_ddp_ppo_keeps_ranks_identical(tmp_path):
    proc = _launch("cpu_ddp.yaml", [str(ROOT / "tests" / "integration" / "ppo_ddp_script.py"), str(tmp_path)], 29541)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "rank0.safetensors"))
    b = load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("value.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == 2 and r0["version"] == 2 and len(r0["logs"]) == 2
    for h0, h1 in zip(r0["logs"], r1["logs"]):  # PPO's metrics are averaged over both ranks
        assert h0["objective/scores"] == h1["objective/scores"] and h0["loss/value_avg"] == h1["loss/value_avg"]
        assert h0["episode"] == 2 * 8 * (r0["logs"].index(h0) + 1)  # 8 rows per rank and update


@pytest.mark.slow
def test_ppo_recipe_under_deepspeed_zero2_on_two_cpu_processes(tmp_path):
    from test_recipes_deepspeed import _ensure_deepspeed

    _ensure_deepspeed()  # installs the extra when missing, as the GRPO DeepSpeed test does
    run_dir = tmp_path / "zero2"
    script = [str(ROOT / "recipes" / "ppo.py"), "--config", str(ROOT / "recipes" / "configs" / "ppo.yaml")]
    for kv in ("tiny=true", "steps=2", "prompts=4", "max_new_tokens=8", f"run_dir={run_dir}"):
        script += ["--set", kv]
    proc = _launch("deepspeed_zero2.yaml", script, 29543)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["headline"]["steps"] == 2 and len(rep["series"]["loss/value_avg"]) == 2
