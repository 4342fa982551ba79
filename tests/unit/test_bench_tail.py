"""The tail bench's summary (paired ratios, best fixed k, phases) and the roofline table on a tiny model."""

from __future__ import annotations

import pytest

from atlas_rl.bench.harness import ConfigSummary, RunResult
from atlas_rl.bench.roofline import render_roofline_markdown, roofline_table, weight_chain_ms
from atlas_rl.bench.tail import TailOptions, _cell_summary, _configs, render_tail_markdown
from atlas_rl.models import tiny_llama
from atlas_rl.rollout import RolloutEngine
from atlas_rl.rollout.cpu_glue import glue_kernels
from atlas_rl.rollout.kernel_tune import GLUE_MAX_ROWS
from atlas_rl.types import SpecStats


def _summary(name: str, seconds: list[float], forward_s: float, steps: int) -> ConfigSummary:
    s = ConfigSummary(name, "w")
    for sec in seconds:
        st = SpecStats(num_steps=steps, num_row_forwards=steps, num_emitted_tokens=100, total_s=sec)
        st.forward_s = forward_s
        s.runs.append(RunResult(name, "w", 100, sec, st))
    return s


def test_tail_summary_pairs_repeats_and_picks_the_best_fixed_k():
    results = {
        "k0": _summary("k0", [10.0, 20.0, 10.0], 5.0, 100),
        "suffix_k2": _summary("suffix_k2", [5.0, 10.0, 10.0], 2.0, 50),  # paired ratios 2, 2, 1
        "suffix_k4": _summary("suffix_k4", [10.0, 10.0, 10.0], 2.0, 50),  # 1, 2, 1
        "default": _summary("default", [8.0, 16.0, 8.0], 2.0, 60),
    }
    cell = _cell_summary(results, ["suffix"], [2, 4])
    s2 = cell["configs"]["suffix_k2"]
    assert s2["ratio_vs_k0"] == pytest.approx(2.0) and (s2["ratio_min"], s2["ratio_max"]) == (1.0, 2.0)
    assert cell["best_fixed"] == {"suffix": "suffix_k2"}
    assert cell["configs"]["k0"]["ms_per_step"]["forward"] == pytest.approx(50.0)
    assert cell["configs"]["suffix_k2"]["tau"] == pytest.approx(2.0)
    report = {"cells": {"rows1_T0": {"rows": 1, "temperature": 0.0, **cell}}}
    md = render_tail_markdown(report)
    assert "| 1 | 0 |" in md and "1.25x (1.25-1.25)" in md and "suffix_k2" in md


def test_roofline_table_on_a_tiny_model_interleaves_engines_and_chain():
    model = tiny_llama(vocab_size=64)
    chain = weight_chain_ms(model, 3)
    kernels = {k: v for k, v in chain.items() if k != "best"}
    assert {"linear", "mm"} <= set(kernels) and chain["best"] == min(kernels.values()) > 0  # the fastest stream
    assert ("glue" in kernels) == (glue_kernels() is not None)  # the engine's few-row loops are a candidate too
    assert "glue" not in weight_chain_ms(model, GLUE_MAX_ROWS + 1)  # above their rows they are not
    engines = {"lean": RolloutEngine(model)}
    table = roofline_table(engines, rows=(1, 2), tokens=(1, 3), context=8, repeats=2, max_columns=4)
    assert set(table["ms"]["lean"]) == {(1, 1), (1, 3), (2, 1)}  # 2 x 3 = 6 columns > max_columns
    assert sorted(table["chain"]) == [1, 2, 3]
    assert "| 2 |" in render_roofline_markdown(table)


@pytest.mark.parametrize("fixed", [True, False])
def test_tail_runs_the_fixed_configurations_unless_told_not_to(fixed):
    model = tiny_llama(vocab_size=64)  # no shipped head: the default speculators are the suffix index alone
    configs, speculators = _configs(model, [63], TailOptions(ks=[2, 4], fixed=fixed), cost=None)
    assert speculators == ["suffix"]
    assert sorted(configs) == (["default", "k0", "suffix_k2", "suffix_k4"] if fixed else ["default", "k0"])
    cell = _cell_summary({n: _summary(n, [10.0], 5.0, 100) for n in configs}, speculators, [2, 4])
    md = render_tail_markdown({"cells": {"rows1_T0": {"rows": 1, "temperature": 0.0, **cell}}})
    assert ("suffix best fixed" in md) == fixed


def test_a_cell_with_fewer_rows_than_min_prompts_runs_disjoint_prompt_sets_and_sums_them():
    from atlas_rl.bench.harness import run_interleaved
    from atlas_rl.bench.tail import _cell, _workloads
    from atlas_rl.models import tiny_tokenizer

    tok = tiny_tokenizer()  # the held-out prompts, chat-templated byte by byte
    opts = TailOptions(rows=[1], max_new_tokens=4, min_prompts=3)
    assert [opts.prompt_sets(r) for r in (1, 2, 3, 4)] == [3, 2, 1, 1]
    sets = _workloads(tok, 1, 0.0, opts)
    assert len(sets) == 3 and len({tuple(w.prompt_ids[0]) for w in sets}) == 3  # disjoint prompts
    one = _workloads(tok, 1, 0.0, TailOptions(rows=[1], max_new_tokens=4, min_prompts=1))
    assert one[0].prompt_ids == sets[0].prompt_ids and one[0].name == "rows1_T0"  # the first set does not move
    seen: list[list[list[int]]] = []

    def runner(w):
        seen.append(w.prompt_ids)
        st = SpecStats(num_steps=2, num_row_forwards=2, num_emitted_tokens=3, total_s=0.5)
        return type("B", (), {"stats": st})(), 4, 0.5

    w, configs = _cell(sets, {"k0": runner})
    assert w.name == "rows1_T0" and w.description.startswith("3 sets of 1 held-out prompts")
    res = run_interleaved(w, configs, repeats=2)["k0"]
    assert seen == [s.prompt_ids for s in sets] * 2
    run = res.runs[0]
    assert (run.completion_tokens, run.seconds, run.stats.num_emitted_tokens) == (12, 1.5, 9)
    assert res.tokens_per_s == pytest.approx(8.0) and res.mean_acceptance_length == pytest.approx(1.5)


def test_interleaved_repeats_alternate_their_order_and_keep_runs_paired_by_repeat():
    """A B, B A, A B: a machine drifting within a repeat does not always favour the configuration that runs first,
    and each configuration's runs stay in repeat order (the ratios to k=0 pair runs of the same repeat)."""
    from atlas_rl.bench.harness import run_interleaved
    from atlas_rl.bench.workloads import Workload
    from atlas_rl.types import SamplingParams

    calls: list[tuple[str, int]] = []

    def runner(name: str):
        def run(w):
            rep = sum(1 for n, _ in calls if n == name)
            calls.append((name, rep))
            st = SpecStats(num_steps=1, num_row_forwards=1, num_emitted_tokens=1, total_s=0.1)
            return type("B", (), {"stats": st})(), 10 * (rep + 1), 1.0

        return run

    w = Workload("w", "one prompt", [[1, 2]], 1, SamplingParams(max_new_tokens=2))
    out = run_interleaved(w, {"k0": runner("k0"), "default": runner("default")}, repeats=3)
    assert calls == [("k0", 0), ("default", 0), ("default", 1), ("k0", 1), ("k0", 2), ("default", 2)]
    assert [r.completion_tokens for r in out["k0"].runs] == [10, 20, 30]
    assert [r.completion_tokens for r in out["default"].runs] == [10, 20, 30]


@pytest.mark.parametrize("module", ["atlas_rl.bench.roofline", "atlas_rl.bench.forward_profile"])
def test_bench_commands_reject_a_wrong_flag_with_one_line(module, capsys):
    """A mistyped flag ends the command with exit status 2 and a one-line message naming it, before any model
    loads (it was a transformers traceback)."""
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main(["--out_dir", "x"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "out_dir" in err and "\n" not in err
