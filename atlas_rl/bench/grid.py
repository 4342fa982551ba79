"""``atlas-rl bench --scenario grid``: the auto controller against the best fixed configurations.

For each number of active rows (1, 4, 16, 64; ``ignore_eos`` keeps every row active to the end), on the same
prompts and seeds, interleaved: the engine without speculation (k=0), each speculator at fixed k for every k in
``ks`` (its best k is picked afterwards, from the same run), and the auto controller over all speculators.
Reports tokens/s, the ratio to k=0, the mean acceptance length, the controller's ratio to the best fixed
configuration and its planning overhead per step (plan + choose + update). Writes ``grid.json`` and ``grid.md``.
The options (:class:`GridOptions`) also drive ``--scenario controller-drift`` (:mod:`.controller_drift`).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from atlas_rl.controller import AutoController, AutoControllerConfig, VerificationCost
from atlas_rl.rollout.build import build_engine, build_speculators
from atlas_rl.speculators.base import Speculator, build_speculator
from atlas_rl.types import SamplingParams

from .common import fmt, start_run
from .harness import ConfigSummary, RunResult, engine_runner, run_interleaved
from .workloads import Workload, grpo_workload

logger = logging.getLogger(__name__)

SpeculatorFactory = Callable[[], Speculator]


@dataclass
class GridOptions:
    """What ``atlas-rl bench --scenario grid`` and ``--scenario controller-drift`` run."""

    model: str | None = field(default=None, metadata={"help": "Target model path/id; None = embedded default."})
    out_dir: str = field(
        default="bench_out", metadata={"help": "Where the JSON and markdown reports go.", "aliases": ["--out"]}
    )
    batch_sizes: tuple[int, ...] = field(default=(1, 4, 16, 64), metadata={"help": "Active rows per grid cell."})
    ks: tuple[int, ...] = field(default=(1, 2, 4, 8), metadata={"help": "Fixed draft lengths tried per speculator."})
    speculators: tuple[str, ...] = field(
        default=("auto",),
        metadata={
            "help": "Speculator names: registered ones (e.g. 'suffix'), 'static' (the head shipped for the model), "
            "or 'auto' = suffix, plus static when a head ships for the model."
        },
    )
    num_speculative_tokens: int = field(
        default=8, metadata={"help": "The auto controller's longest draft.", "aliases": ["--max_k", "--max-k"]}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "New tokens per row."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the grid (RL: 1.0)."})
    repeats: int = field(default=1, metadata={"help": "Interleaved repetitions of every configuration."})
    drift_rows: int = field(default=4, metadata={"help": "controller-drift: rows (distinct prompts, greedy)."})
    drift_rounds: int = field(default=6, metadata={"help": "controller-drift: generate() calls (rounds)."})
    drift_alphas: tuple[float, float] = field(
        default=(0.9, 0.2),
        metadata={"help": "controller-drift: acceptance of speculator A in the first and last round (B: reversed)."},
    )

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be integers >= 1, got {self.batch_sizes}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks must be integers >= 1 (k=0 is always included), got {self.ks}")
        if not (1 <= self.num_speculative_tokens <= 64):
            raise ValueError(f"num_speculative_tokens must lie in [1, 64], got {self.num_speculative_tokens}")
        if self.repeats < 1 or self.drift_rounds < 2 or self.drift_rows < 1:
            raise ValueError("repeats must be >= 1, drift_rounds >= 2 and drift_rows >= 1")
        if not all(0.0 <= a <= 1.0 for a in self.drift_alphas):
            raise ValueError(f"drift_alphas must lie in [0, 1], got {self.drift_alphas}")


QUICK = dict(max_new_tokens=32, drift_rows=2, drift_rounds=3, ks=(1, 2, 4), batch_sizes=(1, 4, 16))  # --quick


def calibrate(model: torch.nn.Module, eos: list[int], num_speculative_tokens: int) -> tuple[VerificationCost, dict]:
    """Calibrate (or load) the verification cost before anything is timed; the cost model and its description.

    The auto configurations get a fresh copy of this table for every run, so a calibration the engine would
    not cache (the machine looked busy) is not measured again inside a timed run."""
    eng = build_engine(model, [_NullSpeculator()], k=num_speculative_tokens, controller="auto", eos_token_ids=eos)
    cost = eng.verification_cost()
    eng.release()
    return cost, {
        "from_cache": cost.from_cache,
        "reliable": cost.reliable,
        "calibration_s": cost.calibration_s,
        "measured_ms": {f"{r}x{t}": round(s * 1e3, 2) for (r, t), s in sorted(cost.measured.items())},
    }


def auto_controller(cost: VerificationCost, num_speculative_tokens: int) -> AutoController:
    """A fresh auto controller over a fresh copy of the calibrated table (nothing learned carries over)."""
    cfg = AutoControllerConfig(num_speculative_tokens=num_speculative_tokens)
    return AutoController(cfg, cost=VerificationCost.from_json(cost.to_json()))


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


def speculator_factories(model: torch.nn.Module, names: tuple[str, ...]) -> dict[str, SpeculatorFactory]:
    """A fresh speculator per engine; ``"static"`` is the draft head shipped for ``model`` (clear error if none);
    ``("auto",)`` = suffix, plus static when a head ships."""
    from atlas_rl.speculators.defaults import static_head_path

    shipped = static_head_path(model) is not None  # a path lookup: no checkpoint read just to ask
    if tuple(names) == ("auto",):
        names = ("suffix", "static") if shipped else ("suffix",)
    if "static" in names and not shipped:
        build_speculators(model, ["static"])  # raises the error that says how to get a static head
    return {
        name: (lambda: build_speculators(model, ["static"]).speculators[0])
        if name == "static"
        else (lambda name=name: build_speculator(name))
        for name in names
    }


def _configs(model: torch.nn.Module, eos: list[int], cost: VerificationCost, opts: GridOptions) -> dict:
    factories = speculator_factories(model, opts.speculators)
    configs = {"k0": engine_runner(lambda: build_engine(model, eos_token_ids=eos))}
    for sp, make in factories.items():
        for k in opts.ks:
            configs[f"{sp}_k{k}"] = engine_runner(
                lambda make=make, k=k: build_engine(model, [make()], k=k, controller="fixed", eos_token_ids=eos)
            )
    configs["auto"] = engine_runner(
        lambda: build_engine(
            model,
            [m() for m in factories.values()],
            controller=auto_controller(cost, opts.num_speculative_tokens),
            eos_token_ids=eos,
        )
    )
    return configs


def run_grid(opts: GridOptions, command: str = "atlas-rl bench --scenario grid") -> dict:
    """Run the grid (module docstring); writes ``grid.json`` (after every cell) and ``grid.md``."""
    run = start_run(opts, command, scenario="grid", cells={})
    cost, run.report["verification_cost"] = calibrate(run.model, run.eos, opts.num_speculative_tokens)
    configs = _configs(run.model, run.eos, cost, opts)
    speculators = sorted({name.rsplit("_k", 1)[0] for name in configs if "_k" in name})
    for rows in opts.batch_sizes:
        w = _grid_workload(run.tokenizer, rows, opts)
        logger.info("grid cell %s: %s", w.name, w.description)
        results = run_interleaved(w, configs, repeats=opts.repeats)
        cell = _summary(results, speculators, opts.ks)
        run.report["cells"][str(rows)] = {"description": w.description, **cell, "runs": _runs(results)}
        run.write("grid")
    run.write("grid", render_grid_markdown)
    return run.report


# ---------------------------------------------------------------------------------------------- report
def render_grid_markdown(report: dict) -> str:
    lines = [f"# atlas-rl bench grid — {report['model']} on {report['device']}", ""]
    vc = report.get("verification_cost", {})
    busy = "" if vc.get("reliable", True) else ", disturbed: the machine looked busy"
    lines += [
        f"Verification cost {'loaded from cache' if vc.get('from_cache') else 'calibrated'} "
        f"({fmt(vc.get('calibration_s', math.nan), 1)} s{busy}).",
        "",
        "| rows | k=0 tok/s | best fixed | × k=0 | auto tok/s | auto × k=0 | auto × best fixed | auto τ "
        "| plan ms/step | spec-off steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rows, cell in report["cells"].items():
        by = {r["config"]: r for r in cell["rows"]}
        best, auto, k0 = by[cell["best_fixed"]], by["auto"], by["k0"]
        lines.append(
            f"| {rows} | {fmt(k0['tokens_per_s'], 1)} | {cell['best_fixed']} ({fmt(best['tokens_per_s'], 1)}) | "
            f"{fmt(best['ratio_vs_k0'])} | {fmt(auto['tokens_per_s'], 1)} | {fmt(auto['ratio_vs_k0'])} | "
            f"{fmt(cell['auto_vs_best_fixed'])} | {fmt(auto['mean_acceptance_length'])} | "
            f"{fmt(auto['plan_ms_per_step'])} | {fmt(100 * auto['spec_off_step_share'], 0)}% |"
        )
    lines.append("")
    for rows, cell in report["cells"].items():
        lines += [f"## {rows} rows: {cell['description']}", "", "| config | tok/s | × k=0 | τ | plan ms/step |"]
        lines.append("|---|---|---|---|---|")
        for r in cell["rows"]:
            lines.append(
                f"| {r['config']} | {fmt(r['tokens_per_s'], 1)} | {fmt(r['ratio_vs_k0'])} | "
                f"{fmt(r['mean_acceptance_length'])} | {fmt(r['plan_ms_per_step'])} |"
            )
        lines.append("")
    lines += [f"Command: `{report['command']}` ({fmt(report.get('wall_s', math.nan), 0)} s)", ""]
    return "\n".join(lines)
