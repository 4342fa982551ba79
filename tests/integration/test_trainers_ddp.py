"""Two CPU processes (DDP over gloo) under `accelerate launch`: the run finishes and the adaptive speculator is
identical on both ranks (rank 0 trains it, every rank receives its weights before each rollout)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_process_ddp_keeps_speculators_identical(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"),
        "--main_process_port",
        "29531",
        str(ROOT / "tests" / "integration" / "ddp_grpo_script.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "rank0.safetensors"))
    b = load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps0, version0, world = (tmp_path / "rank0.txt").read_text().split()
    assert int(world) == 2 and int(version0) == 2 and int(steps0) > 0  # rank 0 really trained it
