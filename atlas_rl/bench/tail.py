"""``tail`` bench: speculation in the long tail of a rollout batch (few active rows), on prompts never trained on.

For each number of active rows (default 1, 2, 4, 8) and temperature (0 and 1): that many prompts of the held-out
split of the broad prompt set (the split the shipped static head was not trained on), one sample each, 128 new
tokens, ``ignore_eos`` so every row stays active; a cell with fewer rows than ``min_prompts`` runs several
disjoint prompt sets in turn (one prompt is a noisy sample of the one-row regime). Configurations, interleaved and
repeated (default 3): the engine without speculation (k=0), each default speculator alone at every fixed k of ``ks``
(its best k is picked afterwards, from the same run), and the default engine (auto controller over all default
speculators: the suffix index and the shipped static head). Reported: tokens/s, the ratio to k=0 (median of the
per-repeat ratios, with their min-max spread), the mean acceptance length tau, and per-phase milliseconds per
decode step.

Run: ``atlas-rl bench --scenario tail --out_dir runs/tail`` (writes ``tail.json`` and ``tail.md``; also
``python -m atlas_rl.bench.tail``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from atlas_rl.config import DEFAULT_MAX_K, EngineConfig
from atlas_rl.controller import FixedController
from atlas_rl.rollout.engine import RolloutEngine
from atlas_rl.types import SamplingParams, SpecStats

from .common import start_run
from .grid import auto_controller, calibrate, speculator_factories
from .harness import ConfigSummary, Runner, engine_runner, run_interleaved
from .workloads import Workload, chat_ids

logger = logging.getLogger(__name__)

PHASES = ("forward", "verify", "propose", "plan", "other")


@dataclass
class TailOptions:
    """What ``atlas-rl bench --scenario tail`` runs."""

    model: str | None = field(default=None, metadata={"help": "Target model path/id; None = embedded default."})
    out_dir: str = field(default="bench_out", metadata={"help": "Where tail.json and tail.md go."})
    rows: list[int] = field(default_factory=lambda: [1, 2, 4, 8], metadata={"help": "Active rows per cell."})
    temperatures: list[float] = field(default_factory=lambda: [0.0, 1.0], metadata={"help": "Sampling temperatures."})
    ks: list[int] = field(
        default_factory=lambda: [2, 4], metadata={"help": "Fixed draft lengths tried per speculator (best kept)."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "New tokens per row (EOS ignored)."})
    repeats: int = field(default=3, metadata={"help": "Interleaved repetitions of every configuration."})
    seed: int = field(default=0, metadata={"help": "Sampling seed (T > 0) and prompt choice."})
    fixed: bool = field(
        default=True,
        metadata={"help": "Also run each speculator alone at every k of ks (false: k=0 and the default only)."},
    )
    min_prompts: int = field(
        default=4,
        metadata={
            "help": "Distinct prompts per cell at least: a cell of r rows runs ceil(min_prompts / r) disjoint sets of "
            "r prompts, one call each, in every repeat (one prompt is a noisy sample of the one-row regime)."
        },
    )

    def __post_init__(self) -> None:
        if not self.rows or any(r < 1 for r in self.rows):
            raise ValueError(f"rows must be integers >= 1, got {self.rows}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks must be integers >= 1 (k=0 is always included), got {self.ks}")
        if any(t < 0 for t in self.temperatures) or not self.temperatures:
            raise ValueError(f"temperatures must be >= 0, got {self.temperatures}")
        if self.repeats < 1 or self.max_new_tokens < 1 or self.min_prompts < 1:
            raise ValueError("repeats, max_new_tokens and min_prompts must be >= 1")

    def prompt_sets(self, rows: int) -> int:
        """Disjoint prompt sets a cell of ``rows`` active rows runs in every repeat."""
        return -(-self.min_prompts // rows)


QUICK = dict(rows=[1, 2], temperatures=[0.0], ks=[2], max_new_tokens=16, repeats=1, min_prompts=1)  # --quick


def held_out_prompt_ids(tokenizer, count: int, seed: int = 0) -> list[list[int]]:
    """``count`` chat-templated prompts of the held-out split of the broad prompt set (the static head's split:
    ``broad_prompts(seed=0)``, ``split_prompts(held_out_fraction=0.1, seed=0)``), in a ``seed``-shuffled order."""
    import random

    from atlas_rl.data.broad_prompts import broad_prompts, split_prompts

    _, held = split_prompts(broad_prompts(seed=0), held_out_fraction=0.1, seed=0)
    held = list(held)
    random.Random(seed).shuffle(held)
    out = []
    for it in (held * (1 + count // max(1, len(held))))[:count]:
        msgs = [{"role": "system", "content": it["system"]}] if "system" in it else []
        out.append(chat_ids(tokenizer, msgs + [{"role": "user", "content": it["prompt"]}]))
    return out


def _workloads(tokenizer, rows: int, temperature: float, opts: TailOptions) -> list[Workload]:
    """The cell's prompt sets: ``opts.prompt_sets(rows)`` disjoint sets of ``rows`` held-out prompts (the first set
    is the same whatever the number of sets)."""
    sets = opts.prompt_sets(rows)
    prompts = held_out_prompt_ids(tokenizer, rows * sets, opts.seed + rows)
    sampling = SamplingParams(
        temperature=temperature, max_new_tokens=opts.max_new_tokens, seed=opts.seed, ignore_eos=True
    )
    return [
        Workload(
            name=f"rows{rows}_T{temperature:g}" + (f"_set{i}" if sets > 1 else ""),
            description=f"{rows} held-out prompts x 1, T={temperature:g}, {opts.max_new_tokens} tokens, no EOS"
            + (f", set {i + 1} of {sets}" if sets > 1 else ""),
            prompt_ids=prompts[i * rows : (i + 1) * rows],
            num_generations=1,
            sampling=sampling,
        )
        for i in range(sets)
    ]


def over_prompt_sets(runner: Runner, workloads: list[Workload]) -> Runner:
    """A runner that runs ``runner`` on every workload in turn (whatever workload it is given) and returns their
    sums: one batch-like object whose ``stats`` merge every call's, the completion tokens and the seconds."""

    def run(_: Workload) -> tuple[SimpleNamespace, int, float]:
        stats, tokens, secs = SpecStats(), 0, 0.0
        for w in workloads:
            t0 = time.perf_counter()
            res = runner(w)
            secs += res[2] if len(res) > 2 else time.perf_counter() - t0
            tokens += res[1]
            if res[0] is not None and res[0].stats is not None:
                stats.merge(res[0].stats)
        return SimpleNamespace(stats=stats), tokens, secs

    return run


def _cell(sets: list[Workload], configs: dict[str, Runner]) -> tuple[Workload, dict[str, Runner]]:
    """The cell's workload and runners: the one set as is, or several sets run in turn by every runner."""
    if len(sets) == 1:
        return sets[0], configs
    w = dataclasses.replace(
        sets[0],
        name=sets[0].name.rsplit("_set", 1)[0],
        description=f"{len(sets)} sets of " + sets[0].description.rsplit(", set ", 1)[0],
        prompt_ids=[p for s in sets for p in s.prompt_ids],
    )
    return w, {name: over_prompt_sets(r, sets) for name, r in configs.items()}


def _configs(model, eos: list[int], opts: TailOptions, cost) -> tuple[dict[str, Runner], list[str]]:
    factories = speculator_factories(model, ("auto",))
    configs: dict[str, Runner] = {"k0": engine_runner(lambda: RolloutEngine(model, eos_token_ids=eos))}
    for sp, make in factories.items() if opts.fixed else ():
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
    # the default engine: auto controller (num_speculative_tokens = DEFAULT_MAX_K) over all default speculators;
    # its cost table is a fresh copy of the one calibrated before timing (what a default engine loads from its cache)
    configs["default"] = engine_runner(
        lambda: RolloutEngine(
            model,
            speculators=[m() for m in factories.values()],
            eos_token_ids=eos,
            controller=auto_controller(cost, DEFAULT_MAX_K),
        )
    )
    return configs, list(factories)


def _phases_ms(s: ConfigSummary) -> dict[str, float]:
    """Median over repeats of milliseconds per decode step spent in each phase."""
    out: dict[str, list[float]] = {p: [] for p in PHASES}
    for r in s.runs:
        st = r.stats
        if st is None or st.num_steps == 0:
            continue
        decode = st.total_s - st.prefill_s
        parts = {"forward": st.forward_s, "verify": st.verify_s, "propose": st.propose_s, "plan": st.plan_s}
        parts["other"] = decode - sum(parts.values())
        for p, v in parts.items():
            out[p].append(v * 1e3 / st.num_steps)
    return {p: statistics.median(v) if v else math.nan for p, v in out.items()}


def _cell_summary(results: dict[str, ConfigSummary], speculators: list[str], ks: list[int]) -> dict:
    base = results["k0"].runs
    rows = {}
    for name, s in results.items():
        ratios = [r.tokens_per_s / b.tokens_per_s for r, b in zip(s.runs, base)]
        rows[name] = {
            "tokens_per_s": s.tokens_per_s,
            "ratio_vs_k0": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "tau": s.mean_acceptance_length,
            "ms_per_step": _phases_ms(s),
        }
    best = {}
    for sp in speculators:
        cands = [f"{sp}_k{k}" for k in ks if f"{sp}_k{k}" in rows]
        if cands:
            best[sp] = max(cands, key=lambda c: rows[c]["ratio_vs_k0"])
    return {"configs": rows, "best_fixed": best}


def run_tail(opts: TailOptions, command: str = "atlas-rl bench --scenario tail") -> dict:
    """Run the tail bench; writes ``tail.json`` (after every cell) and ``tail.md`` into ``opts.out_dir``."""
    run = start_run(opts, command, scenario="tail", cells={})
    cost, run.report["verification_cost"] = calibrate(run.model, run.eos, DEFAULT_MAX_K)
    configs, speculators = _configs(run.model, run.eos, opts, cost)
    for temperature in opts.temperatures:
        for rows in opts.rows:
            sets = _workloads(run.tokenizer, rows, temperature, opts)
            w, cell_configs = _cell(sets, configs)
            logger.info("tail cell %s: %s", w.name, w.description)
            results = run_interleaved(w, cell_configs, repeats=opts.repeats)
            run.report["cells"][w.name] = {
                "rows": rows,
                "temperature": temperature,
                "prompt_sets": len(sets),
                "description": w.description,
                **_cell_summary(results, speculators, opts.ks),
            }
            run.write("tail")
    run.write("tail", render_tail_markdown)
    return run.report


def _ratio(c: dict) -> str:
    return f"{c['ratio_vs_k0']:.2f}x ({c['ratio_min']:.2f}-{c['ratio_max']:.2f})"


def render_tail_markdown(report: dict) -> str:
    """The headline table (default and best fixed per speculator vs k=0, per cell) and per-phase timings."""
    cells = report["cells"]
    specs = sorted({sp for c in cells.values() for sp in c["best_fixed"]})
    head = ["rows", "T", "k=0 tok/s", "default vs k=0 (spread)", "tau default"]
    head += [f"{sp} best fixed (k, tau)" for sp in specs]
    lines = [
        f"# tail bench\n\n`{report.get('command', '')}`, {report.get('device', '')}, {report.get('dtype', '')}\n",
        "Ratios: median of the per-repeat ratios to k=0 (min-max over repeats), interleaved runs.\n",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for c in cells.values():
        cf = c["configs"]
        line = [str(c["rows"]), f"{c['temperature']:g}", f"{cf['k0']['tokens_per_s']:.1f}", _ratio(cf["default"])]
        line.append(f"{cf['default']['tau']:.2f}")
        for sp in specs:
            b = c["best_fixed"].get(sp)
            line.append("" if b is None else f"{_ratio(cf[b])} ({b.rsplit('_k', 1)[1]}, {cf[b]['tau']:.2f})")
        lines.append("| " + " | ".join(line) + " |")
    lines += ["", "Milliseconds per decode step by phase (median over repeats):", ""]
    lines += ["| cell | config | " + " | ".join(PHASES) + " | tau |", "|---" * (len(PHASES) + 3) + "|"]
    for name, c in cells.items():
        for cfg, v in c["configs"].items():
            ph = " | ".join(f"{v['ms_per_step'][p]:.1f}" for p in PHASES)
            lines.append(f"| {name} | {cfg} | {ph} | {v['tau']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from atlas_rl.argparsing import ConfigParser

    opts = ConfigParser([TailOptions], prog="python -m atlas_rl.bench.tail").parse(argv)
    report = run_tail(opts, command="python -m atlas_rl.bench.tail " + " ".join(argv or sys.argv[1:]))
    sys.stdout.write(render_tail_markdown(report))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
