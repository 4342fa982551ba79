"""The GRPO recipe under DeepSpeed ZeRO-2 and ZeRO-3 with 2 CPU processes through accelerate (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _ensure_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:  # the test setup installs the extra when it is missing
        env = dict(os.environ, DS_BUILD_OPS="0")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "deepspeed>=0.16"], env=env, check=True, timeout=1800
        )


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_grpo_recipe_under_deepspeed_on_two_cpu_processes(tmp_path, stage):
    _ensure_deepspeed()
    run_dir = tmp_path / f"zero{stage}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "recipes" / "accelerate" / f"deepspeed_zero{stage}.yaml"),
        str(ROOT / "recipes" / "grpo.py"),
        "--config",
        str(ROOT / "recipes" / "configs" / "grpo.yaml"),
        "--set",
        "tiny=true",
        "--set",
        "steps=2",
        "--set",
        "prompts=2",
        "--set",
        "generations=2",
        "--set",
        "max_new_tokens=8",
        "--set",
        f"run_dir={run_dir}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["headline"]["steps"] == 2
