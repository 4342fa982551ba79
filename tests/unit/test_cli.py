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
    with pytest.raises(SystemExit):
        main(["demo", "--algo", "ppo"])


def test_grid_speculators_static_without_a_shipped_head_is_a_clear_error():
    from atlas_rl.bench.grid import _speculator_factories
    from atlas_rl.models import tiny_llama

    model = tiny_llama(seed=0)
    assert list(_speculator_factories(model, ("auto",))) == ["suffix"]  # no head ships for a random tiny model
    with pytest.raises(ValueError, match="no static draft head ships"):
        _speculator_factories(model, ("suffix", "static"))


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
