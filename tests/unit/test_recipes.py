"""Recipes: scripts and YAML configs say how they are launched; accelerate configs load; a tiny GRPO recipe runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ACCEL = ROOT / "recipes" / "accelerate"


@pytest.mark.parametrize(
    "name, dist_type, procs",
    [
        ("cpu.yaml", "NO", 1),
        ("cpu_ddp.yaml", "MULTI_GPU", 2),
        ("multi_gpu.yaml", "MULTI_GPU", 8),
        ("deepspeed_zero2.yaml", "DEEPSPEED", 2),
        ("deepspeed_zero3.yaml", "DEEPSPEED", 2),
    ],
)
def test_accelerate_configs_load_through_accelerate(name, dist_type, procs):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ACCEL / name))
    assert str(cfg.distributed_type).split(".")[-1] == dist_type and cfg.num_processes == procs
    if dist_type == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == (2 if "zero2" in name else 3)
    first = (ACCEL / name).read_text().splitlines()[0]
    assert first.startswith("# accelerate launch --config_file recipes/accelerate/" + name)


@pytest.mark.parametrize("script", ["grpo", "rloo"])
def test_scripts_and_configs_give_their_launch_command(script):
    doc = (ROOT / "recipes" / f"{script}.py").read_text()
    cmd = f"recipes/{script}.py --config recipes/configs/{script}.yaml"
    assert cmd in doc
    cfg_text = (ROOT / "recipes" / "configs" / f"{script}.yaml").read_text()
    assert cfg_text.splitlines()[0].startswith("# accelerate launch") and cmd in cfg_text.splitlines()[0]
    fields = yaml.safe_load(cfg_text)
    from atlas_rl.trainers.runner import TaskRunConfig

    TaskRunConfig(**fields)  # every YAML field is a TaskRunConfig field with a valid value


def test_static_speculator_config_gives_its_command():
    path = ROOT / "recipes" / "configs" / "static_speculator.yaml"
    assert path.read_text().splitlines()[0].startswith("# ")
    assert "train_static_speculator.py" in path.read_text().splitlines()[0]


def test_tiny_grpo_recipe_runs(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "recipes" / "grpo.py"),
        "--config",
        str(ROOT / "recipes/configs/grpo.yaml"),
        "--set",
        "tiny=true",
        "--set",
        "steps=1",
        "--set",
        "prompts=2",
        "--set",
        "generations=2",
        "--set",
        "max_new_tokens=8",
        "--set",
        f"run_dir={run_dir}",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["headline"]["steps"] == 1


def test_task_config_reads_yaml_exponent_strings_and_rejects_bad_numbers():
    from atlas_rl.trainers.runner import TaskRunConfig

    # `--set learning_rate=5e-5` goes through yaml.safe_load, which (YAML 1.1) returns the string "5e-5"
    assert TaskRunConfig(learning_rate=yaml.safe_load("5e-5")).learning_rate == 5e-5
    with pytest.raises(ValueError, match="learning_rate must be a number"):
        TaskRunConfig(learning_rate="fast")
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        TaskRunConfig(temperature=-1.0)
