"""Recipes: the commands they document parse into valid configs, their YAML configs load, mistakes are one-line
errors with exit status 2, accelerate configs load, and a tiny GRPO recipe runs end to end."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from atlas_rl.trainers.runner import TaskRunConfig, parse_recipe_args

ROOT = Path(__file__).resolve().parents[2]
ACCEL = ROOT / "recipes" / "accelerate"


def _script_args(command: str, script: str) -> list[str]:
    """The arguments after ``script`` in a documented command line."""
    tokens = shlex.split(command)
    return tokens[next(i for i, t in enumerate(tokens) if t.endswith(script)) + 1 :]


def _documented_commands(path: Path, script: str) -> list[str]:
    """Command lines for ``script`` quoted in ``path`` (docstring lines, YAML comments, markdown backticks)."""
    out = []
    for line in path.read_text().splitlines():
        for part in line.lstrip("# ").split("`"):
            if script in part and ("--config" in part or "launch" in part):
                out.append(part.strip())
    return out


def _load_static_recipe():
    spec = importlib.util.spec_from_file_location(
        "train_static_speculator", ROOT / "recipes/train_static_speculator.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


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
def test_accelerate_configs_load_and_their_command_parses(name, dist_type, procs, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ACCEL / name))
    assert str(cfg.distributed_type).split(".")[-1] == dist_type and cfg.num_processes == procs
    if dist_type == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == (2 if "zero2" in name else 3)
    (command,) = _documented_commands(ACCEL / name, "recipes/grpo.py")
    assert f"--config_file recipes/accelerate/{name}" in command
    monkeypatch.chdir(ROOT)
    assert parse_recipe_args("grpo", "", _script_args(command, "recipes/grpo.py")).algo == "grpo"


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_recipe_commands_in_docstring_and_config_parse_into_the_yaml_values(algo, monkeypatch):
    import yaml

    monkeypatch.chdir(ROOT)
    script = f"recipes/{algo}.py"
    commands = _documented_commands(ROOT / script, script) + _documented_commands(
        ROOT / "recipes" / "configs" / f"{algo}.yaml", script
    )
    assert len(commands) >= 2
    values = yaml.safe_load((ROOT / "recipes" / "configs" / f"{algo}.yaml").read_text())
    for command in commands:
        cfg = parse_recipe_args(algo, "", _script_args(command, script))
        assert isinstance(cfg, TaskRunConfig) and cfg.algo == algo
        assert {k: getattr(cfg, k) for k in values} == values  # every YAML key is a field, read as written


def test_docs_recipe_commands_with_set_parse_typed(monkeypatch):
    """docs/results quote `--set KEY=VALUE` (YAML 1.1 reads 5e-5 as a string: the parser types it)."""
    monkeypatch.chdir(ROOT)
    commands = _documented_commands(ROOT / "docs/results/grpo_atlas_vs_transformers.md", "recipes/grpo.py")
    assert commands
    for command in commands:
        cfg = parse_recipe_args("grpo", "", _script_args(command, "recipes/grpo.py"))
        assert (
            cfg.learning_rate == 5e-5 and cfg.backend in ("atlas", "transformers") and cfg.run_dir.startswith("runs/")
        )
    cfg = parse_recipe_args(
        "grpo", "", ["--config", "recipes/configs/grpo.yaml", "--set", "seed=1", "--learning_rate", "5e-5"]
    )
    assert cfg.seed == 1 and cfg.learning_rate == 5e-5


def test_recipe_trainer_fields_are_typed_into_extra(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    argv = ["--config", "recipes/configs/grpo.yaml", "--atlas_controller", "fixed", "--set", "beta=0.1"]
    cfg = parse_recipe_args("grpo", "", argv + ["--atlas_max_draft_tokens", "6", "--steps", "3"])
    assert cfg.steps == 3 and cfg.extra == {"atlas_controller": "fixed", "beta": 0.1, "atlas_max_draft_tokens": 6}
    yaml_cfg = tmp_path / "g.yaml"
    yaml_cfg.write_text("steps: 2\nextra: {atlas_max_draft_tokens: 3}\nshuffle_dataset: true\n")
    cfg = parse_recipe_args("grpo", "", ["--config", str(yaml_cfg)])
    assert cfg.steps == 2 and cfg.extra == {"atlas_max_draft_tokens": 3, "shuffle_dataset": True}


@pytest.mark.parametrize(
    "yaml_text, argv, message",
    [
        ("stepz: 3\n", [], "unknown option(s) ['stepz']: not TaskRunConfig or AtlasGRPOConfig fields"),
        ("steps: three\n", [], "invalid int value: 'three'"),
        ("steps: 1.5\n", [], "steps must be an integer, got 1.5"),
        ("steps: 0\n", [], "steps must be an int >= 1"),
        ("algo: dpo\n", [], "algo must be 'grpo', 'rloo' or 'ppo'"),
        ("extra: {atlas_max_draft_tokens: six}\n", [], "invalid int value: 'six'"),
        ("", ["--bogus", "1"], "unknown option(s) ['bogus']"),
        ("", ["--learning_rate", "fast"], "invalid float value: 'fast'"),
        ("", ["--set", "generations"], "is not KEY=VALUE"),
        ("steps: [1\n", [], "is not valid YAML"),
    ],
)
def test_recipe_config_mistakes_are_one_line_errors_with_exit_2(yaml_text, argv, message, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(SystemExit) as e:
        parse_recipe_args("grpo", "", ["--config", str(cfg), *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and "\n" not in err


def test_recipe_script_missing_config_file_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "rloo.py"), "--config", "no/such.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "recipes/rloo.py: error: config file no/such.yaml does not exist (see recipes/rloo.py --help)"
    )


def test_recipe_missing_model_directory_is_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    from atlas_rl.trainers.runner import recipe_main

    monkeypatch.chdir(ROOT)
    argv = ["--config", "recipes/configs/grpo.yaml", "--model", str(tmp_path / "no_model"), "--run_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        recipe_main("grpo", "", argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "no_model" in err and "does not exist" in err and "\n" not in err


def test_static_speculator_commands_parse_into_the_yaml_values(monkeypatch):
    import yaml

    recipe = _load_static_recipe()
    monkeypatch.chdir(ROOT)
    path = ROOT / "recipes" / "configs" / "static_speculator.yaml"
    commands = _documented_commands(path, "train_static_speculator.py")
    commands += _documented_commands(ROOT / "recipes" / "train_static_speculator.py", "train_static_speculator.py")
    assert commands
    values = yaml.safe_load(path.read_text())
    for command in commands:
        rc, cfg, _ = recipe.parse_args(_script_args(command, "train_static_speculator.py"))
        parsed = {**vars(rc), **vars(cfg)}
        for k, v in values.items():
            assert parsed[k] == (tuple(v) if isinstance(v, list) else v), k


def test_static_speculator_overrides_key_value_and_flags(monkeypatch, capsys):
    recipe = _load_static_recipe()
    monkeypatch.chdir(ROOT)
    base = ["--config", "recipes/configs/static_speculator.yaml"]
    rc, cfg, command = recipe.parse_args([*base, "epochs=1", "fuse_layers=[3,15,28]", "ship_to=null", "--data-only"])
    assert cfg.epochs == 1.0 and cfg.fuse_layers == (3, 15, 28) and rc.ship_to is None and rc.data_only
    assert command.endswith("epochs=1 'fuse_layers=[3,15,28]' ship_to=null --data-only")
    rc, cfg, _ = recipe.parse_args([*base, "--fuse_layers", "1,2,3", "--max_train_prompts", "64"])
    assert cfg.fuse_layers == (1, 2, 3) and rc.max_train_prompts == 64
    shipped = "atlas_rl/data/speculators/smollm2-135m-instruct-eagle3"  # continue the shipped head
    _, cfg, _ = recipe.parse_args([*base, f"init_from={shipped}", "teacher_forced_fraction=0"])
    assert cfg.init_from == shipped and cfg.teacher_forced_fraction == 0.0
    bad_args = (
        (["epochz=1"], "unknown option(s) ['epochz']"),
        (["betas=[0.9]"], "betas must hold 2"),
        (["init_from=/nonexistent"], "init_from must be a draft head directory"),
    )
    for bad, message in bad_args:
        with pytest.raises(SystemExit) as e:
            recipe.parse_args([*base, *bad])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_tiny_grpo_recipe_runs(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "recipes" / "grpo.py"),
        "--config",
        str(ROOT / "recipes/configs/grpo.yaml"),
        "--set",
        "tiny=true",
        "--steps",
        "1",
        "--prompts",
        "2",
        "--generations",
        "2",
        "--max-new-tokens",
        "8",
        "--run_dir",
        str(run_dir),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["headline"]["steps"] == 1


def test_task_config_rejects_bad_numbers():
    with pytest.raises(ValueError, match="learning_rate must be a number"):
        TaskRunConfig(learning_rate="fast")
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        TaskRunConfig(temperature=-1.0)


def test_pruned_draft_vocab_keeps_the_most_frequent_rows_and_drafts_losslessly():
    """recipes/prune_draft_vocab.py: the first n draft tokens (the most frequent) with their output rows; nothing
    else changes, and the smaller head keeps greedy output identical to plain decoding."""
    import torch

    from atlas_rl import SamplingParams
    from atlas_rl.controller import FixedController
    from atlas_rl.models import tiny_llama
    from atlas_rl.rollout import RolloutEngine
    from atlas_rl.speculators.draft_head import DraftHead, DraftHeadConfig
    from atlas_rl.speculators.head_speculator import DraftHeadSpeculator

    spec = importlib.util.spec_from_file_location("prune_draft_vocab", ROOT / "recipes/prune_draft_vocab.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = tiny_llama(vocab_size=64, seed=0)
    cfg = DraftHeadConfig.from_target(model, draft_vocab_size=48, fuse_layers=(1, 2), intermediate_size=32)
    head = DraftHead(cfg, draft_to_target=torch.randperm(64)[:48]).bind_target(model, init_lm_head=True)
    small = mod.pruned(head, 40).bind_target(model)
    assert small.config.draft_vocab_size == 40 and torch.equal(small.draft_to_target, head.draft_to_target[:40])
    assert torch.equal(small.lm_head.weight, head.lm_head.weight[:40]) and torch.equal(small.fc.weight, head.fc.weight)
    sp = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    base = RolloutEngine(model).generate([[1, 2, 3], [4, 5]], sp)
    eng = RolloutEngine(model, speculators=[DraftHeadSpeculator(small)], controller=FixedController(3))
    assert eng.generate([[1, 2, 3], [4, 5]], sp).completion_ids == base.completion_ids


def test_vllm_recipe_configs_parse(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = parse_recipe_args("grpo", "", ["--config", "recipes/configs/grpo_vllm.yaml"])
    assert cfg.backend == "atlas" and cfg.extra == {"atlas_engine": "vllm"}
    cfg = parse_recipe_args("grpo", "", ["--config", "recipes/configs/grpo_vllm_server.yaml"])
    assert cfg.extra == {"atlas_engine": "vllm", "atlas_vllm_server": "http://VLLM_HOST:8000"}
