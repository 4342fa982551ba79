"""``atlas-rl bench --scenario controller-drift``: does the controller follow speculators whose quality drifts?

Greedy rollouts over several rounds (like RL steps) with two synthetic speculators of known quality
(:class:`~atlas_rl.bench.synthetic.ReplayOracleSpeculator`) whose per-token acceptance drifts in opposite
directions, as a draft model trained once degrades while an adaptive one improves. Each configuration keeps one
engine over all rounds. The auto controller (both speculators) is compared with each speculator alone at its best
fixed k. Options: :class:`~atlas_rl.bench.grid.GridOptions` (``drift_*`` fields). Writes
``controller_drift.json`` and ``controller_drift.md``. (Not to be confused with ``--scenario policy-drift``, where
the policy itself is fine-tuned: :mod:`atlas_rl.bench.policy_drift`.)
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from atlas_rl.rollout.build import build_engine
from atlas_rl.rollout.engine import RolloutEngine
from atlas_rl.types import SamplingParams, SpecStats

from .common import fmt, start_run
from .grid import QUICK, GridOptions, auto_controller, calibrate
from .synthetic import ReplayOracleSpeculator
from .workloads import chat_ids

logger = logging.getLogger(__name__)

__all__ = ["QUICK", "GridOptions", "render_controller_drift_markdown", "run_controller_drift"]

Engines = dict[str, tuple[RolloutEngine, list[ReplayOracleSpeculator]]]


def _schedule(opts: GridOptions) -> dict[str, list[float]]:
    """Per-token acceptance of A and B in every round: A drifts from ``drift_alphas[0]`` to ``[1]``, B back."""
    (a0, a1), n = opts.drift_alphas, opts.drift_rounds
    return {
        "A": [a0 + (a1 - a0) * i / (n - 1) for i in range(n)],
        "B": [a1 + (a0 - a1) * i / (n - 1) for i in range(n)],
    }


def _prompts(tokenizer: Any, rows: int) -> list[list[int]]:
    from atlas_rl.data.prompts import GENERAL_PROMPTS

    texts = (GENERAL_PROMPTS * (1 + rows // len(GENERAL_PROMPTS)))[:rows]
    return [chat_ids(tokenizer, [{"role": "user", "content": p}]) for p in texts]


def _engines(
    model: torch.nn.Module, eos: list[int], reference: list[list[int]], opts: GridOptions, cost: Any
) -> Engines:
    """k=0, A and B alone at every fixed k, and the auto controller over both (each one engine for all rounds)."""
    vocab = int(model.get_output_embeddings().weight.shape[0])
    alpha0 = {name: alphas[0] for name, alphas in _schedule(opts).items()}

    def oracle(name: str, seed: int) -> ReplayOracleSpeculator:
        return ReplayOracleSpeculator(reference, alpha0[name], vocab, name=name, confidence=0.5, seed=seed)

    engines: Engines = {"k0": (build_engine(model, eos_token_ids=eos), [])}
    for name in ("A", "B"):
        for k in opts.ks:
            spec = oracle(name, seed=k)
            engines[f"{name}_k{k}"] = (build_engine(model, [spec], k=k, controller="fixed", eos_token_ids=eos), [spec])
    both = [oracle("A", seed=101), oracle("B", seed=102)]
    ctrl = auto_controller(cost, opts.num_speculative_tokens)
    engines["auto"] = (build_engine(model, both, controller=ctrl, eos_token_ids=eos), both)
    return engines


def _rounds(engines: Engines, prompts: list[list[int]], opts: GridOptions) -> tuple[list[dict], dict, dict]:
    """Every round, every engine (speculator qualities set first); per-round tok/s, totals, merged stats."""
    schedule = _schedule(opts)
    sp = SamplingParams(temperature=0.0, max_new_tokens=opts.max_new_tokens, ignore_eos=True)
    totals = {name: [0, 0.0] for name in engines}
    stats = {name: SpecStats() for name in engines}
    per_round: list[dict] = []
    for rnd in range(opts.drift_rounds):
        line: dict[str, Any] = {"round": rnd, "alpha_A": schedule["A"][rnd], "alpha_B": schedule["B"][rnd]}
        for name, (eng, specs) in engines.items():
            for s in specs:
                s.alpha = schedule[s.name][rnd]
            t = time.perf_counter()
            batch = eng.generate(prompts, sp)
            secs = time.perf_counter() - t
            totals[name][0] += batch.num_completion_tokens
            totals[name][1] += secs
            stats[name].merge(batch.stats)
            line[name] = batch.num_completion_tokens / secs
            logger.info("controller-drift round %d %s: %.1f tok/s", rnd, name, line[name])
        per_round.append(line)
    return per_round, totals, stats


def _share(st: SpecStats, name: str) -> float:
    return st.per_speculator[name].num_drafts / st.num_row_forwards if name in st.per_speculator else 0


def _rows(totals: dict, stats: dict) -> list[dict[str, Any]]:
    base = totals["k0"][0] / totals["k0"][1]
    return [
        {
            "config": name,
            "tokens_per_s": tok / secs,
            "ratio_vs_k0": tok / secs / base,
            "mean_acceptance_length": stats[name].mean_acceptance_length,
            "plan_ms_per_step": stats[name].plan_ms_per_step,
            "share_A": _share(stats[name], "A"),
            "share_B": _share(stats[name], "B"),
        }
        for name, (tok, secs) in totals.items()
    ]


def run_controller_drift(opts: GridOptions, command: str = "atlas-rl bench --scenario controller-drift") -> dict:
    """Run the scenario (module docstring); writes ``controller_drift.json`` and ``controller_drift.md``."""
    run = start_run(opts, command, scenario="controller-drift")
    model, eos = run.model, run.eos
    cost, run.report["verification_cost"] = calibrate(model, eos, opts.num_speculative_tokens)
    prompts = _prompts(run.tokenizer, opts.drift_rows)
    sp = SamplingParams(temperature=0.0, max_new_tokens=opts.max_new_tokens, ignore_eos=True)
    reference = build_engine(model, eos_token_ids=eos).generate(prompts, sp).completion_ids
    per_round, totals, stats = _rounds(_engines(model, eos, reference, opts, cost), prompts, opts)
    rows = _rows(totals, stats)
    by = {r["config"]: r for r in rows}
    best = {n: max((by[f"{n}_k{k}"] for k in opts.ks), key=lambda r: r["tokens_per_s"])["config"] for n in "AB"}
    run.report |= {
        "rounds": per_round,
        "rows": rows,
        "best_fixed_per_speculator": best,
        "auto_vs_best_fixed": by["auto"]["tokens_per_s"] / max(by[c]["tokens_per_s"] for c in best.values()),
    }
    run.write("controller_drift", render_controller_drift_markdown)
    return run.report


def render_controller_drift_markdown(report: dict) -> str:
    o = report["options"]
    lines = [
        f"# atlas-rl bench controller-drift — {report['model']} on {report['device']}",
        "",
        f"Controller drift: {o['drift_rows']} greedy rows, {o['drift_rounds']} rounds; synthetic speculator A's "
        f"per-token acceptance drifts {o['drift_alphas'][0]} → {o['drift_alphas'][1]}, B's the other way. Best "
        f"fixed: {report['best_fixed_per_speculator']}; auto × best fixed single speculator: "
        f"{fmt(report['auto_vs_best_fixed'])}.",
        "",
        "| config | tok/s | × k=0 | τ | share A | share B | plan ms/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['config']} | {fmt(r['tokens_per_s'], 1)} | {fmt(r['ratio_vs_k0'])} | "
            f"{fmt(r['mean_acceptance_length'])} | {fmt(r['share_A'])} | {fmt(r['share_B'])} | "
            f"{fmt(r['plan_ms_per_step'])} |"
        )
    lines += ["", f"Command: `{report['command']}` ({fmt(report.get('wall_s'), 0)} s)", ""]
    return "\n".join(lines)
