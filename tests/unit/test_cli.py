"""The atlas-rl command: demo on a tiny model writes a full report; clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from atlas_rl.cli import main
from atlas_rl.metrics.report import HEADLINE_FIELDS


def test_tiny_demo_writes_a_report_with_every_headline_field(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(
        [
            "demo",
            "--tiny",
            "--steps",
            "1",
            "--prompts",
            "2",
            "--generations",
            "2",
            "--max-new-tokens",
            "8",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    for key in HEADLINE_FIELDS:
        assert key in rep["headline"], key
    assert rep["headline"]["steps"] == 1 and rep["headline"]["baseline_rollout_tokens_per_s"] > 0
    html = (out / "report.html").read_text()
    assert html.count('class="plot"') == 7 and "data:image/png;base64," in html
    est = rep["headline"]["per_speculator"]["adaptive"]["estimated_acceptance_length_first"]
    assert 1.0 <= est <= 5.0  # the adaptive head replayed on the captured rollout (k=4)
    assert "estimated τ (T=1)" in (out / "report.md").read_text()
    printed = capsys.readouterr().out
    assert "speed-up:" in printed and "mean acceptance length" in printed


def test_report_errors_are_clear(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["report", str(tmp_path)]) == 2
    assert "no training-step metrics" in capsys.readouterr().err


def test_demo_bad_model_path_is_clear(tmp_path, capsys):
    assert (
        main(["demo", "--model", str(tmp_path / "no_such_model"), "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    )
    assert "no_such_model" in capsys.readouterr().err


def test_demo_bad_flags_are_clear(capsys):
    assert main(["demo", "--tiny", "--generations", "1"]) == 2
    assert "generations" in capsys.readouterr().err
    assert main(["demo", "--algo", "dpo"]) == 2  # ppo is an algo since issue 16
    assert "algo must be 'grpo', 'rloo' or 'ppo'" in capsys.readouterr().err


def test_grid_speculators_static_without_a_shipped_head_is_a_clear_error():
    from atlas_rl.bench.grid import speculator_factories
    from atlas_rl.models import tiny_llama

    model = tiny_llama(seed=0)
    assert list(speculator_factories(model, ("auto",))) == ["suffix"]  # no head ships for a random tiny model
    with pytest.raises(ValueError, match="no static draft head ships"):
        speculator_factories(model, ("suffix", "static"))


def test_bench_finds_the_vllm_venv_python_without_resolving_its_symlink(tmp_path, monkeypatch):
    from atlas_rl.bench.run import find_vllm_python

    bindir = tmp_path / ".venv-vllm" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "python3").write_text("")
    (bindir / "python").symlink_to("python3")  # as venv makes it: resolving it would leave the venv
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ATLAS_RL_VLLM_PYTHON", raising=False)
    assert find_vllm_python() == str(bindir / "python")
    assert find_vllm_python("none") is None


def test_bench_engine_runner_times_generate_not_engine_construction():
    """A rollout's cost is generate(): building the engine (loading a draft head) happens once per training run."""
    import time

    import torch

    from atlas_rl import SamplingParams
    from atlas_rl.bench.harness import engine_runner, run_interleaved
    from atlas_rl.bench.workloads import Workload
    from atlas_rl.models import tiny_llama
    from atlas_rl.rollout import RolloutEngine

    model = tiny_llama(vocab_size=64, dtype=torch.float32, seed=0)

    def slow_to_build() -> RolloutEngine:
        time.sleep(0.5)  # e.g. a draft head read from disk
        return RolloutEngine(model)

    sp = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    w = Workload("w", "one row", [[1, 2, 3]], 1, sp)
    out = run_interleaved(w, {"slow": engine_runner(slow_to_build)})
    run = out["slow"].runs[0]
    assert run.completion_tokens == 4 and 0 < run.seconds < 0.5


def test_bench_reports_the_first_error_of_a_failed_vllm_run_not_the_tail():
    from atlas_rl.bench.harness import _root_cause

    stderr = "\n".join(
        ["INFO loading"] * 50
        + ["Traceback (most recent call last):", '  File "x.py", line 1', "RuntimeError: the real cause"]
        + ["INFO shutdown noise"] * 200
        + ["vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue."]
    )
    msg = _root_cause(stderr)
    assert msg.startswith("first error: Traceback") and "the real cause" in msg
    assert _root_cause("just noise").startswith("last output: just noise")


def test_bench_hf_runner_left_pads_prompts_of_different_lengths():
    """The HF baseline of the bench: a left-padded batch gives each prompt the tokens it gets alone (greedy)."""
    import torch

    from atlas_rl.bench.harness import hf_generate_runner
    from atlas_rl.bench.workloads import Workload, left_pad
    from atlas_rl.models import tiny_llama, tiny_token_ids, tiny_tokenizer
    from atlas_rl.types import SamplingParams

    ids, mask = left_pad([[5, 6], [7], [1, 2, 3]], 0)
    assert ids.tolist() == [[0, 5, 6], [0, 0, 7], [1, 2, 3]] and mask.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), hidden_size=64, seed=0, **tiny_token_ids(tok)).eval()
    prompts = [[5, 9, 11, 4, 7], [8, 3]]
    eos = [int(model.generation_config.eos_token_id or 0)]
    w = Workload("t", "t", prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=6))
    _, n_tokens = hf_generate_runner(model, tok, eos)(w)
    alone = 0
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=eos[0])
            row = out[0, len(p) :].tolist()
            alone += next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
    assert n_tokens == alone > 0


def test_bench_root_cause_reaches_the_exception_line_of_a_long_prefixed_traceback():
    from atlas_rl.bench.harness import _root_cause

    prefix = "(Worker pid=1) ERROR 11-29 07:01:46 [multiproc_executor.py:1063] " + "x" * 60
    lines = [prefix + " Traceback (most recent call last):"] + [prefix + f" frame {i}" for i in range(30)]
    lines.append(prefix + " RuntimeError: CPU Generator does not use offset")
    msg = _root_cause("\n".join(lines))
    assert msg.startswith("first error: ") and msg.endswith("RuntimeError: CPU Generator does not use offset")


# ------------------------------------------------------------------------------------------------ bench parsing
def _bench_options(argv: list[str]):
    """What `atlas-rl bench ARGV` would run: (scenario name, options), parsed by the real parser."""
    from atlas_rl.cli import bench_parser

    parser, scenario = bench_parser(argv)
    command, opts = parser.parse(argv)
    return scenario.name, opts


@pytest.mark.parametrize(
    "argv, scenario, expected",
    [  # the command lines README.md and docs/results quote
        ("--ks 2,4 --out bench_out/full", "default", dict(ks=(2, 4), out_dir="bench_out/full", max_new_tokens=128)),
        (
            "--scenario grid --ks 2,4 --max-new-tokens 64 --repeats 3 --out bench_out/grid_clean2",
            "grid",
            dict(ks=(2, 4), max_new_tokens=64, repeats=3, out_dir="bench_out/grid_clean2", batch_sizes=(1, 4, 16, 64)),
        ),
        (
            "--scenario controller-drift --ks 2,4 --max-new-tokens 64 --out bench_out/controller_drift",
            "controller-drift",
            dict(ks=(2, 4), max_new_tokens=64, drift_rounds=6, drift_alphas=(0.9, 0.2)),
        ),
        (
            "--workloads greedy,tail --no-hf --no-stack --ks 2 --no-cost-table --out bench_out/vllm",
            "default",
            dict(workloads=("greedy", "tail"), hf=False, stack=False, ks=(2,), cost_table=False, vllm=True),
        ),
        (
            "--workloads grpo --ks 2 --no-cost-table --no-stack",
            "default",
            dict(workloads=("grpo",), ks=(2,), cost_table=False, stack=False, hf=True),
        ),
        ("--scenario drift --versions 4 --out bench_out/drift", "policy-drift", dict(num_versions=4, k=4)),
        ("--scenario policy-drift --versions 4", "policy-drift", dict(num_versions=4)),
        ("", "default", dict(ks=(2, 4, 8), workloads=("grpo", "greedy", "tail"), repeats=1, hf=True)),
        ("--no-vllm --vllm-python /x/python", "default", dict(vllm=False, vllm_python="/x/python")),
        (
            "--scenario grid --speculators suffix,static --batch-sizes 1,4",
            "grid",
            dict(speculators=("suffix", "static"), batch_sizes=(1, 4)),
        ),
        (
            "--scenario drift --model tiny --static-head h.safetensors --k 2",
            "policy-drift",
            dict(model="tiny", static_head="h.safetensors", k=2),
        ),
        (
            "--scenario tail --rows 1,4 --temperatures 0 --ks 2 --repeats 5 --out_dir runs/tail",
            "tail",
            dict(rows=[1, 4], temperatures=[0.0], ks=[2], repeats=5, max_new_tokens=128, out_dir="runs/tail"),
        ),
        ("--scenario tail --quick --repeats 2", "tail", dict(rows=[1, 2], max_new_tokens=16, repeats=2)),
    ],
)
def test_bench_command_lines_parse_to_their_options(argv, scenario, expected):
    name, opts = _bench_options(argv.split())
    assert name == scenario
    assert {k: getattr(opts, k) for k in expected} == expected


def test_bench_flag_equal_to_a_default_is_still_given():
    """The old CLI compared flags with the default bench's defaults to guess whether they were given."""
    assert _bench_options(["--scenario", "grid", "--ks", "2,4,8"])[1].ks == (2, 4, 8)  # grid's own default: 1,2,4,8
    assert _bench_options(["--scenario", "drift", "--max-new-tokens", "128"])[1].max_new_tokens == 128  # drift: 64
    quick = _bench_options(["--scenario", "grid", "--quick", "--ks", "1,2,4,8", "--max-new-tokens", "128"])[1]
    assert quick.ks == (1, 2, 4, 8) and quick.max_new_tokens == 128 and quick.batch_sizes == (1, 4, 16)


def test_bench_quick_presets_apply_per_scenario():
    from atlas_rl.bench.policy_drift import QUICK as DRIFT_QUICK
    from atlas_rl.bench.run import QUICK as BENCH_QUICK

    _, opts = _bench_options(["--quick"])
    assert all(getattr(opts, k) == v for k, v in BENCH_QUICK.items())
    _, opts = _bench_options(["--scenario", "drift", "--quick", "--versions", "5"])
    assert opts.num_versions == 5 and opts.finetune_steps == DRIFT_QUICK["finetune_steps"]


def test_bench_reads_a_yaml_config_and_flags_override_it(tmp_path):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text("scenario: grid\nks: [3, 5]\nmax_new_tokens: 48\nrepeats: 2\n")
    name, opts = _bench_options(["--config", str(cfg), "--repeats", "4"])
    assert name == "grid" and opts.ks == (3, 5) and opts.max_new_tokens == 48 and opts.repeats == 4


def _patch_scenario(monkeypatch, module: str, run: str, render: str) -> list:
    """Replace a scenario's run (the bench itself) by a recorder: main() then parses for real and stops there."""
    import importlib

    seen: list = []
    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, run, lambda opts, command: seen.append((opts, command)) or {"wall_s": 0.0})
    monkeypatch.setattr(mod, render, lambda report: "")
    return seen


def test_bench_main_runs_grid_with_the_given_ks(monkeypatch, tmp_path):
    seen = _patch_scenario(monkeypatch, "atlas_rl.bench.grid", "run_grid", "render_grid_markdown")
    argv = ["bench", "--scenario", "grid", "--ks", "2,4,8", "--max-new-tokens", "128", "--out", str(tmp_path)]
    assert main(argv) == 0
    opts, command = seen[0]
    assert opts.ks == (2, 4, 8) and opts.max_new_tokens == 128 and opts.out_dir == str(tmp_path)
    assert command.startswith("atlas-rl bench --scenario grid --ks 2,4,8")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus", "1"], "unknown argument"),
        (["--ks", "two"], "invalid int value"),
        (["--ks", "0"], "ks must be >= 1"),
        (["--scenario", "nope"], "invalid choice"),
        (["--workloads", "grpo,chat"], "unknown workloads"),
        (["--config", "/no/such.yaml"], "/no/such.yaml does not exist"),
        (["--set", "ks=[1.5]"], "ks[0] must be an integer"),
        (["--scenario", "drift", "--versions", "1"], "num_versions must be >= 2"),
    ],
)
def test_bench_option_mistakes_are_one_line_errors_with_exit_2(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_bench_missing_model_is_a_one_line_error_with_exit_2(tmp_path, capsys):
    assert main(["bench", "--model", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nonexistent" in err and "does not exist" in err and "\n" not in err


def test_demo_flags_parse_into_the_task_config():
    from atlas_rl.cli import demo_parser

    argv = "--model m --algo rloo --steps 3 --prompts 2 --generations 3 --max-new-tokens 16 --lr 5e-5"
    argv += " --speculators static,suffix --no-baseline --out runs/x --seed 7"
    cfg = demo_parser().parse(argv.split())
    assert (cfg.model, cfg.algo, cfg.steps, cfg.prompts, cfg.generations) == ("m", "rloo", 3, 2, 3)
    assert (cfg.max_new_tokens, cfg.learning_rate, cfg.speculators) == (16, 5e-5, "static,suffix")
    assert (cfg.baseline_every, cfg.run_dir, cfg.seed, cfg.tiny) == (0, "runs/x", 7, False)
    tiny = demo_parser().parse(["--tiny"])
    assert tiny.tiny is True and tiny.baseline_every == 1 and tiny.run_dir == "runs/demo"
    extra = demo_parser().parse(["--extra", "{atlas_controller: fixed, atlas_num_speculative_tokens: 2}"]).extra
    assert extra == {"atlas_controller": "fixed", "atlas_num_speculative_tokens": 2}
    assert demo_parser().parse(["--extra", '{"beta": 0.1}']).extra == {"beta": 0.1}  # JSON is YAML


def test_a_mapping_flag_that_is_not_a_mapping_is_a_one_line_error(capsys):
    assert main(["demo", "--tiny", "--extra", "[1, 2]"]) == 2
    err = capsys.readouterr().err
    assert "expected a YAML mapping" in err and len(err.strip().splitlines()) == 1


def test_help_of_every_command_and_scenario_exits_0(capsys):
    for argv in (["--help"], ["demo", "-h"], ["report", "-h"], ["bench", "-h"]):
        assert main(argv) == 0
    for scenario in ("grid", "tail", "drift", "policy-drift", "adapt", "controller-drift"):
        assert main(["bench", "--scenario", scenario, "--help"]) == 0
    assert "--versions" in capsys.readouterr().out


def test_config_parser_types_yaml_values_like_flags(tmp_path):
    """YAML 1.1 reads 5e-5 as a string and a list may be written 2,4: the parser types both like flags."""
    from atlas_rl.argparsing import ConfigParser
    from atlas_rl.trainers.runner import TaskRunConfig

    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 5e-5\nsteps: 3\n")
    parsed = ConfigParser([TaskRunConfig], prog="t").parse(["--config", str(cfg), "--set", "temperature=7e-1"])
    assert parsed.learning_rate == 5e-5 and parsed.temperature == 0.7 and parsed.steps == 3
    cfg.write_text("scenario: grid\nks: 2,4\n")
    _, opts = _bench_options(["--config", str(cfg)])
    assert opts.ks == (2, 4)
