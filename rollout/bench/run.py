"""``atlas-rl bench``: HF generate vs the engine (k=0) vs the engine with the suffix speculator at fixed k,
on a GRPO-like workload, a greedy workload and the long tail of a GRPO batch, interleaved in one run; plus
the verification cost table of this machine. Writes ``bench.json``, ``cost_table.json`` and ``bench.md``."""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from atlas_rl.config import EngineConfig
from atlas_rl.controller import FixedController
from atlas_rl.rollout.engine import RolloutEngine
from atlas_rl.speculators.suffix import SuffixSpeculator

from .cost import verification_cost_table
from .harness import ConfigSummary, engine_runner, hf_generate_runner, run_interleaved
from .workloads import Workload, greedy_workload, grpo_workload, tail_workload

logger = logging.getLogger(__name__)

TAIL_ROWS = 8


@dataclass
class BenchOptions:
    """What ``atlas-rl bench`` runs."""

    model: str | None = field(default=None, metadata={"help": "Target model path/id; None = embedded default."})
    out_dir: str = field(default="bench_out", metadata={"help": "Where bench.json / bench.md / cost_table.json go."})
    workloads: tuple[str, ...] = field(default=("grpo", "greedy", "tail"), metadata={"help": "Workloads to run."})
    ks: tuple[int, ...] = field(default=(2, 4, 8), metadata={"help": "Fixed draft lengths of the suffix speculator."})
    repeats: int = field(default=1, metadata={"help": "Interleaved repetitions of every configuration."})
    max_new_tokens: int = field(default=128, metadata={"help": "New tokens per sequence."})
    grpo_prompts: int = field(default=8, metadata={"help": "Prompts of the GRPO-like workload."})
    grpo_generations: int = field(default=8, metadata={"help": "Samples per prompt of the GRPO-like workload."})
    greedy_prompts: int = field(default=16, metadata={"help": "Prompts of the greedy workload."})
    with_hf: bool = field(default=True, metadata={"help": "Include HF generate as a configuration."})
    cost_table: bool = field(default=True, metadata={"help": "Measure the verification cost table."})
    cost_rows: tuple[int, ...] = field(default=(1, 4, 16, 64), metadata={"help": "Rows of the cost table."})
    cost_tokens: tuple[int, ...] = field(default=tuple(range(1, 10)), metadata={"help": "Tokens per row."})

    def __post_init__(self) -> None:
        unknown = set(self.workloads) - {"grpo", "greedy", "tail"}
        if unknown:
            raise ValueError(f"unknown workloads {sorted(unknown)}; choose from grpo, greedy, tail")
        if any(k < 1 for k in self.ks):
            raise ValueError(f"ks must be >= 1 (k=0 is always included), got {self.ks}")
        if self.repeats < 1:
            raise ValueError("repeats must be >= 1")


def _configs(model, tokenizer, eos: list[int], opts: BenchOptions) -> dict:
    configs = {}
    if opts.with_hf:
        configs["hf_generate"] = hf_generate_runner(model, tokenizer, eos)
    configs["engine_k0"] = engine_runner(lambda: RolloutEngine(model, eos_token_ids=eos))
    for k in opts.ks:
        configs[f"suffix_k{k}"] = engine_runner(
            lambda k=k: RolloutEngine(
                model,
                speculators=[SuffixSpeculator()],
                eos_token_ids=eos,
                controller=FixedController(k),
                config=EngineConfig(num_speculative_tokens=k),
            )
        )
    return configs


def _summary_rows(results: dict[str, ConfigSummary], baseline: str) -> list[dict]:
    base = results[baseline].tokens_per_s
    base_tail = results[baseline].regime(TAIL_ROWS)["tokens_per_s"]
    rows = []
    for name, s in results.items():
        tail = s.regime(TAIL_ROWS)
        rows.append(
            {
                "config": name,
                "tokens_per_s": s.tokens_per_s,
                "ratio_vs_k0": s.tokens_per_s / base if base else math.nan,
                "mean_acceptance_length": s.mean_acceptance_length,
                "completion_tokens": sum(r.completion_tokens for r in s.runs),
                "seconds": sum(r.seconds for r in s.runs),
                f"tail_le{TAIL_ROWS}_tokens_per_s": tail["tokens_per_s"],
                f"tail_le{TAIL_ROWS}_ratio_vs_k0": tail["tokens_per_s"] / base_tail if base_tail else math.nan,
                f"tail_le{TAIL_ROWS}_mean_acceptance_length": tail["mean_acceptance_length"],
            }
        )
    return rows


def _fmt(x: float, nd: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def render_markdown(report: dict) -> str:
    lines = [f"# atlas-rl bench — {report['model']} on {report['device']}", ""]
    for wname, w in report["workloads"].items():
        lines += [f"## {wname}: {w['description']}", ""]
        t = TAIL_ROWS
        lines += [
            f"| config | tok/s | × k=0 | τ (mean acceptance length) | tok/s at ≤{t} rows | × k=0 at ≤{t} rows "
            f"| τ at ≤{t} rows |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in w["rows"]:
            lines.append(
                f"| {r['config']} | {_fmt(r['tokens_per_s'], 1)} | {_fmt(r['ratio_vs_k0'])} | "
                f"{_fmt(r['mean_acceptance_length'])} | {_fmt(r[f'tail_le{t}_tokens_per_s'], 1)} | "
                f"{_fmt(r[f'tail_le{t}_ratio_vs_k0'])} | {_fmt(r[f'tail_le{t}_mean_acceptance_length'])} |"
            )
        lines.append("")
    if "cost_table" in report:
        ct = report["cost_table"]
        lines += [f"## Verification cost: forward ms (context {ct['context']}), rows × tokens per row", ""]
        lines.append("| rows \\ tokens | " + " | ".join(str(t) for t in ct["tokens"]) + " |")
        lines.append("|---|" + "---|" * len(ct["tokens"]))
        for r, line in zip(ct["rows"], ct["ms"]):
            lines.append(f"| {r} | " + " | ".join(f"{v:.0f}" for v in line) + " |")
        lines += ["", "Relative to 1 token at the same number of rows:", ""]
        lines.append("| rows \\ tokens | " + " | ".join(str(t) for t in ct["tokens"]) + " |")
        lines.append("|---|" + "---|" * len(ct["tokens"]))
        for r, line in zip(ct["rows"], ct["relative"]):
            lines.append(f"| {r} | " + " | ".join(f"{v:.2f}" for v in line) + " |")
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def run_bench(opts: BenchOptions, command: str = "atlas-rl bench") -> dict:
    from atlas_rl.models import load_target

    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tokenizer = load_target(opts.model)
    eos = list(RolloutEngine(model).eos_token_ids)
    workloads: list[Workload] = []
    for name in opts.workloads:
        if name == "grpo":
            workloads.append(grpo_workload(tokenizer, opts.grpo_prompts, opts.grpo_generations, opts.max_new_tokens))
        elif name == "greedy":
            workloads.append(greedy_workload(tokenizer, opts.greedy_prompts, opts.max_new_tokens))
        else:
            workloads.append(tail_workload(tokenizer, TAIL_ROWS, opts.max_new_tokens))
    report: dict = {
        "model": opts.model or "SmolLM2-135M-Instruct (embedded default)",
        "device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
        "dtype": str(next(model.parameters()).dtype),
        "torch": torch.__version__,
        "command": command,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(opts).items()},
        "workloads": {},
    }
    configs = _configs(model, tokenizer, eos, opts)
    for w in workloads:
        logger.info("workload %s: %s", w.name, w.description)
        results = run_interleaved(w, configs, repeats=opts.repeats)
        report["workloads"][w.name] = {
            "description": w.description,
            "rows": _summary_rows(results, "engine_k0"),
            "runs": [
                {
                    "config": r.config,
                    "tokens": r.completion_tokens,
                    "seconds": r.seconds,
                    "stats": r.stats.to_dict() if r.stats else None,
                }
                for s in results.values()
                for r in s.runs
            ],
        }
        (out_dir / "bench.json").write_text(json.dumps(report, indent=1))
    if opts.cost_table:
        logger.info("measuring the verification cost table")
        report["cost_table"] = verification_cost_table(model, rows=opts.cost_rows, tokens=opts.cost_tokens)
        (out_dir / "cost_table.json").write_text(json.dumps(report["cost_table"], indent=1))
    report["wall_s"] = time.perf_counter() - t0
    (out_dir / "bench.json").write_text(json.dumps(report, indent=1))
    (out_dir / "bench.md").write_text(render_markdown(report))
    return report
