"""Two sections of :mod:`atlas_rl.bench.gpu_costs` about what CUDA graphs change besides speed.

* ``outputs``: greedy completions of plain and speculating engines with and without graphs, side by side: the
  share of rows and tokens identical to the eager plain engine, and whether speculation under graphs equals plain
  decoding under graphs (it must: lossless) and speculation without them; with each engine's capture counts.
* ``default``: the default engine (auto controller over the default speculators) against k=0, both as configured
  by default, interleaved repeats: tok/s per repeat and τ (the first repeat shows what new shapes cost); beside
  them the same controller planning at every step (``probe_every=1``: no quiet steps, timings applied at every
  step, as before 2026-12-04 evening) and the default speculators under ``FixedController(0)`` (their per-step
  upkeep alone), with each engine's controller time a step and its steps that drafted.
"""

from __future__ import annotations

import time
from typing import Any

import torch

OUTPUT_ROWS = (1, 5, 16)
DEFAULT_ROWS = (1, 16)
# name -> (k, CUDA graphs) of the output check's engines; "eager_k0" is the reference
OUTPUT_ENGINES = {"eager_k0": (0, False), "graphs_k0": (0, True), "graphs_k2": (2, True), "eager_k2": (2, False)}


def _identical(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(share of rows identical, share of tokens identical position by position)."""
    rows = sum(x == y for x, y in zip(a, b)) / len(a)
    toks = sum(p == q for x, y in zip(a, b) for p, q in zip(x, y)) / max(1, sum(len(x) for x in a))
    return rows, toks


def graph_stats(engine: Any) -> dict:
    """Captures, replays and a failure of the engine's forward graphs and of its draft heads' graphs."""

    def one(g: Any) -> dict | None:
        return None if g is None else {"captures": g.num_captures, "replays": g.num_replays, "failed": g.failed}

    heads = {name: one(getattr(s, "_graphs", None)) for name, s in engine.speculators.items()}
    return {"forward": one(engine._graphs), "heads": heads}


def output_check(model: torch.nn.Module, rows: int, new_tokens: int) -> dict:
    """Greedy completions of :data:`OUTPUT_ENGINES` on ``rows`` random prompts, compared."""
    from atlas_rl.bench.gpu_costs import _spec_engine
    from atlas_rl.types import SamplingParams

    vocab = model.get_output_embeddings().weight.shape[0]
    prompts = torch.randint(0, vocab, (rows, 24), generator=torch.Generator().manual_seed(rows)).tolist()
    sp = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    outs, stats = {}, {}
    for name, (k, graphs) in OUTPUT_ENGINES.items():
        engine = _spec_engine(model, k, graphs)
        outs[name] = engine.generate(prompts, sp).completion_ids
        stats[name] = graph_stats(engine)
    ref = outs["eager_k0"]
    cell: dict = {"rows": rows, "vs_eager_k0": {n: _identical(o, ref) for n, o in outs.items() if n != "eager_k0"}}
    cell["graphs_k2_vs_graphs_k0"] = _identical(outs["graphs_k2"], outs["graphs_k0"])
    cell["graphs_k2_vs_eager_k2"] = _identical(outs["graphs_k2"], outs["eager_k2"])
    return {**cell, "graphs": stats}


def default_vs_plain(model: torch.nn.Module, rows: int, new_tokens: int, repeats: int) -> dict:
    """The default engine and a k=0 engine on ``rows`` random prompts, greedy, ``repeats`` interleaved rounds after
    one warm-up call each: tok/s per round, the default's τ per round."""
    from atlas_rl.bench.gpu_costs import _timed_generate
    from atlas_rl.types import SamplingParams

    t0 = time.perf_counter()
    engines = _default_engines(model)
    build_s = time.perf_counter() - t0
    vocab = model.get_output_embeddings().weight.shape[0]
    prompts = torch.randint(0, vocab, (rows, 24), generator=torch.Generator().manual_seed(rows)).tolist()
    sp = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    out: dict = {"rows": rows, "build_s": build_s, "tau": [], "controller_us_per_step": {}, "drafted_steps": {}}
    for name, engine in engines.items():
        engine.generate(prompts, sp)
        out[f"{name}_tok_s"], out["controller_us_per_step"][name], out["drafted_steps"][name] = [], [], []
    for _ in range(repeats):
        for name, engine in engines.items():
            seconds, stats = _timed_generate(engine, prompts, sp)
            out[f"{name}_tok_s"].append(rows * new_tokens / seconds)
            out["controller_us_per_step"][name].append(1e6 * stats.plan_s / max(stats.num_steps, 1))
            out["drafted_steps"][name].append(sum(1 for s in stats.steps if s.proposals))
            if name == "default":
                out["tau"].append(stats.mean_acceptance_length)
    return {**out, "graphs": graph_stats(engines["default"])}


def _default_engines(model: torch.nn.Module) -> dict[str, Any]:
    """The ``default`` section's engines: k=0, the default one, its controller planning at every step, and the
    default speculators' upkeep under ``FixedController(0)``."""
    from atlas_rl.config import EngineConfig
    from atlas_rl.controller import AutoController, AutoControllerConfig, FixedController
    from atlas_rl.rollout import RolloutEngine
    from atlas_rl.speculators.defaults import default_speculators

    k = EngineConfig().num_speculative_tokens
    every_step = AutoController(AutoControllerConfig(num_speculative_tokens=k, probe_every=1))
    return {
        "k0": RolloutEngine(model, eos_token_ids=[], config=EngineConfig(num_speculative_tokens=0)),
        "default": RolloutEngine(model, speculators=default_speculators(model), eos_token_ids=[]),
        "every_step": RolloutEngine(
            model, speculators=default_speculators(model), eos_token_ids=[], controller=every_step
        ),
        "upkeep": RolloutEngine(
            model, speculators=default_speculators(model), eos_token_ids=[], controller=FixedController(0)
        ),
    }


def outputs_lines(entry: dict) -> list[str]:
    lines = ["greedy outputs: share of rows (tokens) identical", ""]
    lines += [
        "| rows | graphs k=0 vs eager k=0 | graphs k=2 vs graphs k=0 | graphs k=2 vs eager k=2 |",
        "|---|---|---|---|",
    ]
    for c in entry["outputs"]:
        cells = [c["vs_eager_k0"]["graphs_k0"], c["graphs_k2_vs_graphs_k0"], c["graphs_k2_vs_eager_k2"]]
        lines.append(f"| {c['rows']} | " + " | ".join(f"{r:.2f} ({t:.2f})" for r, t in cells) + " |")
    return lines + [""]


def default_lines(entry: dict) -> list[str]:
    lines = ["default engine vs k=0 (tok/s per interleaved repeat; ratios to k=0 of the same repeat)", ""]
    lines += [
        "| rows | k=0 | default | ratio | τ | planning every step | upkeep only | controller µs/step (default) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in entry["default"]:
        cells = [", ".join(f"{v:.{p}f}" for v in c[key]) for key, p in (("k0_tok_s", 1), ("default_tok_s", 1))]
        ratios = [_ratios(c, name) for name in ("default", "every_step", "upkeep")]
        ctl = ", ".join(f"{v:.0f}" for v in c.get("controller_us_per_step", {}).get("default", []))
        lines.append(
            f"| {c['rows']} | {cells[0]} | {cells[1]} | {ratios[0]} | "
            + ", ".join(f"{t:.2f}" for t in c["tau"])
            + f" | {ratios[1]} | {ratios[2]} | {ctl or 'n/a'} |"
        )
    return lines + [""]


def _ratios(cell: dict, name: str) -> str:
    """``name``'s tok/s over k=0's, per repeat ('n/a' for a record made before that engine was measured)."""
    if f"{name}_tok_s" not in cell:
        return "n/a"
    return ", ".join(f"{d / p:.2f}x" for d, p in zip(cell[f"{name}_tok_s"], cell["k0_tok_s"]))
