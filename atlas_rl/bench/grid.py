"""``atlas-rl bench --scenario grid|drift``: the controller against the best fixed configurations.

**grid**: for each number of active rows (1, 4, 16, 64; ``ignore_eos`` keeps every row active to the end), on the
same prompts and seeds, interleaved: the engine without speculation (k=0), each speculator at fixed k for every
k in ``ks`` (its best k is picked afterwards, from the same run), and the auto controller over all speculators.
Reports tokens/s, the ratio to k=0, the mean acceptance length, the controller's ratio to the best fixed
configuration and its planning overhead per step (plan + choose + update).

**drift**: greedy rollouts over several rounds (like RL steps) with two synthetic speculators of known quality
(:class:`ReplayOracleSpeculator`) whose per-token acceptance drifts in opposite directions, as a draft model
trained once degrades while an adaptive one improves. Each configuration keeps one engine over all rounds. The
controller (both speculators) is compared with each speculator alone at its best fixed k.

Writes ``grid.json``/``grid.md`` or ``drift.json``/``drift.md`` into the output directory.
"""

from __future__ import annotations

import logging
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from atlas_rl.config import EngineConfig
from atlas_rl.controller import AutoController, AutoControllerConfig, FixedController, VerificationCost
from atlas_rl.jsonio import write_json
from atlas_rl.rollout.engine import RolloutEngine
from atlas_rl.speculators.base import Speculator, build_speculator
from atlas_rl.types import SamplingParams, SpecStats

from .harness import ConfigSummary, RunResult, engine_runner, run_interleaved
from .synthetic import ReplayOracleSpeculator
from .workloads import Workload, chat_ids, grpo_workload

logger = logging.getLogger(__name__)

SpeculatorFactory = Callable[[], Speculator]


@dataclass
class GridOptions:
    """What ``atlas-rl bench --scenario grid`` / ``--scenario drift`` run."""

    model: str | None = field(default=None, metadata={"help": "Target model path/id; None = embedded default."})
    out_dir: str = field(default="bench_out", metadata={"help": "Where the JSON and markdown reports go."})
    batch_sizes: tuple[int, ...] = field(default=(1, 4, 16, 64), metadata={"help": "Active rows per grid cell."})
    ks: tuple[int, ...] = field(default=(1, 2, 4, 8), metadata={"help": "Fixed draft lengths tried per speculator."})
    speculators: tuple[str, ...] = field(
        default=("auto",),
        metadata={
            "help": "Speculator names: registered ones (e.g. 'suffix'), 'static' (the head shipped for the model), "
            "or 'auto' = suffix, plus static when a head ships for the model."
        },
    )
    max_k: int = field(default=8, metadata={"help": "The controller's longest draft."})
    max_new_tokens: int = field(default=128, metadata={"help": "New tokens per row."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the grid (RL: 1.0)."})
    repeats: int = field(default=1, metadata={"help": "Interleaved repetitions of every configuration."})
    drift_rows: int = field(default=4, metadata={"help": "Rows (distinct prompts, greedy) of the drift scenario."})
    drift_rounds: int = field(default=6, metadata={"help": "generate() calls of the drift scenario."})
    drift_alphas: tuple[float, float] = field(
        default=(0.9, 0.2), metadata={"help": "Acceptance of speculator A in the first and last round (B: reversed)."}
    )

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be integers >= 1, got {self.batch_sizes}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks must be integers >= 1 (k=0 is always included), got {self.ks}")
        if not (1 <= self.max_k <= 64):
            raise ValueError(f"max_k must lie in [1, 64], got {self.max_k}")
        if self.repeats < 1 or self.drift_rounds < 2 or self.drift_rows < 1:
            raise ValueError("repeats must be >= 1, drift_rounds >= 2 and drift_rows >= 1")
        if not all(0.0 <= a <= 1.0 for a in self.drift_alphas):
            raise ValueError(f"drift_alphas must lie in [0, 1], got {self.drift_alphas}")


def _header(opts: GridOptions, model: torch.nn.Module, command: str) -> dict:
    return {
        "model": opts.model or "SmolLM2-135M-Instruct (embedded default)",
        "device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
        "dtype": str(next(model.parameters()).dtype),
        "torch": torch.__version__,
        "command": command,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(opts).items()},
    }


def _calibrate(model: torch.nn.Module, eos: list[int], max_k: int) -> tuple[VerificationCost, dict]:
    """Calibrate (or load) the verification cost before anything is timed; the cost model and its description.

    The auto configurations get a fresh copy of this table for every run, so a calibration the engine would
    not cache (the machine looked busy) is not measured again inside a timed run."""
    eng = RolloutEngine(model, speculators=[_NullSpeculator()], eos_token_ids=eos, config=_auto_config(max_k))
    cost = eng.verification_cost()
    eng.release()
    return cost, {
        "from_cache": cost.from_cache,
        "reliable": cost.reliable,
        "calibration_s": cost.calibration_s,
        "measured_ms": {f"{r}x{t}": round(s * 1e3, 2) for (r, t), s in sorted(cost.measured.items())},
    }


def _auto_controller(cost: VerificationCost, max_k: int) -> AutoController:
    """A fresh auto controller over a fresh copy of the calibrated table (nothing learned carries over)."""
    return AutoController(AutoControllerConfig(max_k=max_k), cost=VerificationCost.from_json(cost.to_json()))


def _auto_config(max_k: int) -> EngineConfig:
    return EngineConfig(controller="auto", num_speculative_tokens=max_k)


class _NullSpeculator:
    """Drafts nothing (lets an engine build its auto controller and cost model without a real speculator)."""

    name = "null"
    hidden_layers: tuple[int, ...] = ()

    def start(self, group_id: int, prompt_ids: list[int], row_ids: list[int]) -> None:
        pass

    def propose(self, rows, max_tokens):
        return [None] * len(max_tokens)

    def observe(self, row_id: int, emitted_ids: list[int]) -> None:
        pass

    def stop(self, group_id: int) -> None:
        pass


def _grid_workload(tokenizer, rows: int, opts: GridOptions) -> Workload:
    """``rows`` active rows as GRPO groups of up to 8 samples, every row kept active (``ignore_eos``)."""
    groups = max(1, rows // 8)
    gens = max(1, rows // groups)
    w = grpo_workload(tokenizer, groups, gens, opts.max_new_tokens, seed=rows)
    w.name = f"rows{groups * gens}"
    w.sampling = SamplingParams(
        temperature=opts.temperature, max_new_tokens=opts.max_new_tokens, seed=rows, ignore_eos=True
    )
    w.description = f"{groups} prompts x {gens} samples, T={opts.temperature}, {opts.max_new_tokens} tokens, no EOS"
    return w


def _summary(results: dict[str, ConfigSummary], speculators: list[str], ks: tuple[int, ...]) -> dict:
    base = results["k0"].tokens_per_s
    rows = []
    for name, s in results.items():
        stats = [r.stats for r in s.runs if r.stats is not None]
        plan_ms = statistics.median(st.plan_ms_per_step for st in stats) if stats else math.nan
        off = sum(st.num_spec_off_steps for st in stats) / max(1, sum(st.num_steps for st in stats))
        rows.append(
            {
                "config": name,
                "tokens_per_s": s.tokens_per_s,
                "ratio_vs_k0": s.tokens_per_s / base if base else math.nan,
                "mean_acceptance_length": s.mean_acceptance_length,
                "plan_ms_per_step": plan_ms,
                "spec_off_step_share": off,
            }
        )
    by = {r["config"]: r for r in rows}
    best_fixed = {}
    for sp in speculators:
        cands = [by[f"{sp}_k{k}"] for k in ks if f"{sp}_k{k}" in by]
        if cands:
            best_fixed[sp] = max(cands, key=lambda r: r["tokens_per_s"])["config"]
    best = max((by[c] for c in best_fixed.values()), key=lambda r: r["tokens_per_s"], default=by["k0"])
    if best["tokens_per_s"] < by["k0"]["tokens_per_s"]:
        best = by["k0"]
    auto = by["auto"]
    return {
        "rows": rows,
        "best_fixed_per_speculator": best_fixed,
        "best_fixed": best["config"],
        "auto_vs_best_fixed": auto["tokens_per_s"] / best["tokens_per_s"],
        "auto_vs_k0": auto["ratio_vs_k0"],
    }


def _runs(results: dict[str, ConfigSummary]) -> list[dict]:
    return [
        {"config": r.config, "tokens": r.completion_tokens, "seconds": r.seconds, "stats": _stats(r)}
        for s in results.values()
        for r in s.runs
    ]


def _stats(r: RunResult) -> dict | None:
    return r.stats.to_dict() if r.stats is not None else None


def _speculator_factories(model: torch.nn.Module, names: tuple[str, ...]) -> dict[str, Callable[[], Speculator]]:
    """A fresh speculator per engine; ``"static"`` is the draft head shipped for ``model`` (clear error if none)."""
    from atlas_rl.speculators.defaults import load_static_speculator, static_head_path

    shipped = static_head_path(model) is not None  # a path lookup: no checkpoint read just to ask
    factories: dict[str, Callable[[], Speculator]] = {}
    if tuple(names) == ("auto",):
        names = ("suffix", "static") if shipped else ("suffix",)
    for name in names:
        if name == "static":
            if not shipped:
                raise ValueError("speculator 'static' requested but no static draft head ships for this model")
            factories[name] = lambda: load_static_speculator(model)
        else:
            factories[name] = lambda name=name: build_speculator(name)
    return factories


def run_grid(opts: GridOptions, command: str = "atlas-rl bench --scenario grid") -> dict:
    from atlas_rl.models import load_target

    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tokenizer = load_target(opts.model)
    eos = list(RolloutEngine(model).eos_token_ids)
    report = _header(opts, model, command) | {"scenario": "grid", "cells": {}}
    cost, report["verification_cost"] = _calibrate(model, eos, opts.max_k)
    factories = _speculator_factories(model, opts.speculators)
    configs = {"k0": engine_runner(lambda: RolloutEngine(model, eos_token_ids=eos))}
    for sp, make in factories.items():
        for k in opts.ks:
            configs[f"{sp}_k{k}"] = engine_runner(
                lambda make=make, sp=sp, k=k: RolloutEngine(
                    model,
                    speculators=[make()],
                    eos_token_ids=eos,
                    controller=FixedController(k, sp),
                    config=EngineConfig(controller="fixed", num_speculative_tokens=k),
                )
            )
    configs["auto"] = engine_runner(
        lambda: RolloutEngine(
            model,
            speculators=[m() for m in factories.values()],
            eos_token_ids=eos,
            controller=_auto_controller(cost, opts.max_k),
        )
    )
    for rows in opts.batch_sizes:
        w = _grid_workload(tokenizer, rows, opts)
        logger.info("grid cell %s: %s", w.name, w.description)
        results = run_interleaved(w, configs, repeats=opts.repeats)
        report["cells"][str(rows)] = {
            "description": w.description,
            **_summary(results, list(factories), opts.ks),
            "runs": _runs(results),
        }
        write_json(out_dir / "grid.json", report)
    report["wall_s"] = time.perf_counter() - t0
    write_json(out_dir / "grid.json", report)
    (out_dir / "grid.md").write_text(render_grid_markdown(report))
    return report


# ---------------------------------------------------------------------------------------------- drift
def run_drift(opts: GridOptions, command: str = "atlas-rl bench --scenario drift") -> dict:
    from atlas_rl.data.prompts import GENERAL_PROMPTS
    from atlas_rl.models import load_target

    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tokenizer = load_target(opts.model)
    eos = list(RolloutEngine(model).eos_token_ids)
    report = _header(opts, model, command) | {"scenario": "drift"}
    cost, report["verification_cost"] = _calibrate(model, eos, opts.max_k)
    prompts = [
        chat_ids(tokenizer, [{"role": "user", "content": p}])
        for p in (GENERAL_PROMPTS * (1 + opts.drift_rows // len(GENERAL_PROMPTS)))[: opts.drift_rows]
    ]
    sp = SamplingParams(temperature=0.0, max_new_tokens=opts.max_new_tokens, ignore_eos=True)
    reference = RolloutEngine(model, eos_token_ids=eos).generate(prompts, sp).completion_ids
    vocab = int(model.get_output_embeddings().weight.shape[0])
    a0, a1 = opts.drift_alphas
    rounds = opts.drift_rounds
    schedule = {
        "A": [a0 + (a1 - a0) * i / (rounds - 1) for i in range(rounds)],
        "B": [a1 + (a0 - a1) * i / (rounds - 1) for i in range(rounds)],
    }

    def oracle(name: str, seed: int) -> ReplayOracleSpeculator:
        return ReplayOracleSpeculator(reference, schedule[name][0], vocab, name=name, confidence=0.5, seed=seed)

    engines: dict[str, tuple[RolloutEngine, list[ReplayOracleSpeculator]]] = {}
    engines["k0"] = (RolloutEngine(model, eos_token_ids=eos), [])
    for name in ("A", "B"):
        for k in opts.ks:
            spec = oracle(name, seed=k)
            eng = RolloutEngine(
                model,
                speculators=[spec],
                eos_token_ids=eos,
                controller=FixedController(k, name),
                config=EngineConfig(controller="fixed", num_speculative_tokens=k),
            )
            engines[f"{name}_k{k}"] = (eng, [spec])
    both = [oracle("A", seed=101), oracle("B", seed=102)]
    engines["auto"] = (
        RolloutEngine(model, speculators=both, eos_token_ids=eos, controller=_auto_controller(cost, opts.max_k)),
        both,
    )
    totals = {name: [0, 0.0] for name in engines}
    per_round: list[dict] = []
    stats = {name: SpecStats() for name in engines}
    for rnd in range(rounds):
        line: dict = {"round": rnd, "alpha_A": schedule["A"][rnd], "alpha_B": schedule["B"][rnd]}
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
            logger.info("drift round %d %s: %.1f tok/s", rnd, name, line[name])
        per_round.append(line)
    base = totals["k0"][0] / totals["k0"][1]
    rows = []
    for name, (tok, secs) in totals.items():
        st = stats[name]
        rows.append(
            {
                "config": name,
                "tokens_per_s": tok / secs,
                "ratio_vs_k0": tok / secs / base,
                "mean_acceptance_length": st.mean_acceptance_length,
                "plan_ms_per_step": st.plan_ms_per_step,
                "share_A": st.per_speculator["A"].num_drafts / st.num_row_forwards if "A" in st.per_speculator else 0,
                "share_B": st.per_speculator["B"].num_drafts / st.num_row_forwards if "B" in st.per_speculator else 0,
            }
        )
    by = {r["config"]: r for r in rows}
    best = {n: max((by[f"{n}_k{k}"] for k in opts.ks), key=lambda r: r["tokens_per_s"])["config"] for n in "AB"}
    report |= {
        "rounds": per_round,
        "rows": rows,
        "best_fixed_per_speculator": best,
        "auto_vs_best_fixed": by["auto"]["tokens_per_s"] / max(by[c]["tokens_per_s"] for c in best.values()),
        "wall_s": time.perf_counter() - t0,
    }
    write_json(out_dir / "drift.json", report)
    (out_dir / "drift.md").write_text(render_drift_markdown(report))
    return report


# ---------------------------------------------------------------------------------------------- reports
def _fmt(x: float, nd: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def render_grid_markdown(report: dict) -> str:
    lines = [f"# atlas-rl bench grid — {report['model']} on {report['device']}", ""]
    vc = report.get("verification_cost", {})
    busy = "" if vc.get("reliable", True) else ", disturbed: the machine looked busy"
    lines += [
        f"Verification cost {'loaded from cache' if vc.get('from_cache') else 'calibrated'} "
        f"({_fmt(vc.get('calibration_s', math.nan), 1)} s{busy}).",
        "",
        "| rows | k=0 tok/s | best fixed | × k=0 | auto tok/s | auto × k=0 | auto × best fixed | auto τ "
        "| plan ms/step | spec-off steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rows, cell in report["cells"].items():
        by = {r["config"]: r for r in cell["rows"]}
        best, auto, k0 = by[cell["best_fixed"]], by["auto"], by["k0"]
        lines.append(
            f"| {rows} | {_fmt(k0['tokens_per_s'], 1)} | {cell['best_fixed']} ({_fmt(best['tokens_per_s'], 1)}) | "
            f"{_fmt(best['ratio_vs_k0'])} | {_fmt(auto['tokens_per_s'], 1)} | {_fmt(auto['ratio_vs_k0'])} | "
            f"{_fmt(cell['auto_vs_best_fixed'])} | {_fmt(auto['mean_acceptance_length'])} | "
            f"{_fmt(auto['plan_ms_per_step'])} | {_fmt(100 * auto['spec_off_step_share'], 0)}% |"
        )
    lines.append("")
    for rows, cell in report["cells"].items():
        lines += [f"## {rows} rows: {cell['description']}", "", "| config | tok/s | × k=0 | τ | plan ms/step |"]
        lines.append("|---|---|---|---|---|")
        for r in cell["rows"]:
            lines.append(
                f"| {r['config']} | {_fmt(r['tokens_per_s'], 1)} | {_fmt(r['ratio_vs_k0'])} | "
                f"{_fmt(r['mean_acceptance_length'])} | {_fmt(r['plan_ms_per_step'])} |"
            )
        lines.append("")
    lines += [f"Command: `{report['command']}` ({_fmt(report.get('wall_s', math.nan), 0)} s)", ""]
    return "\n".join(lines)


def render_drift_markdown(report: dict) -> str:
    o = report["options"]
    lines = [
        f"# atlas-rl bench drift — {report['model']} on {report['device']}",
        "",
        f"{o['drift_rows']} greedy rows, {o['drift_rounds']} rounds; speculator A's per-token acceptance drifts "
        f"{o['drift_alphas'][0]} → {o['drift_alphas'][1]}, B's the other way. Best fixed: "
        f"{report['best_fixed_per_speculator']}; auto × best fixed single speculator: "
        f"{_fmt(report['auto_vs_best_fixed'])}.",
        "",
        "| config | tok/s | × k=0 | τ | share A | share B | plan ms/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['config']} | {_fmt(r['tokens_per_s'], 1)} | {_fmt(r['ratio_vs_k0'])} | "
            f"{_fmt(r['mean_acceptance_length'])} | {_fmt(r['share_A'])} | {_fmt(r['share_B'])} | "
            f"{_fmt(r['plan_ms_per_step'])} |"
        )
    lines += ["", f"Command: `{report['command']}` ({_fmt(report.get('wall_s', math.nan), 0)} s)", ""]
    return "\n".join(lines)
