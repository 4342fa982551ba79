"""Projected speed-up of speculation on an accelerator: the step costs measured there times the acceptance
measured here.

The mean acceptance length τ is a property of the target, the speculators and the prompts, not of the hardware, so
it is measured on the CPU (``tau``: the default speculators, fixed draft lengths, held-out prompts), and the costs
of a plain and a speculating step are measured on the device with random weights of the real shapes
(:mod:`atlas_rl.bench.gpu_costs`). ``project`` combines them per shape, row count and temperature::

    python -m atlas_rl.bench.gpu_projection tau --out runs/tau_cpu.json            # here, on the CPU
    python -m atlas_rl.bench.gpu_projection project --costs runs/gpu/gpu_costs.json --tau runs/tau_cpu.json \\
        --out runs/gpu/projection.md

Speed-up at draft length k = τ(T, k) × step(k=0) / step(k). The device's step of a random head proposes k tokens
and verifies k+1 at every step (its drafts are rejected), so it costs what a drafting step costs; "forward only"
is the same with the cost table's forwards alone (drafting and the step's other work free: the bound that
launch-free drafting and a graph-captured step would approach).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

TAU_KS = (1, 2, 3, 4, 5)


def measure_tau(out: Path, prompts: int, new_tokens: int, ks: tuple[int, ...] = TAU_KS) -> dict:
    """τ of the default speculators (best of static head and suffix, fixed k) on ``prompts`` held-out prompts at
    T=0 and T=1, one call of ``prompts`` rows each; written to ``out`` after every cell."""
    from atlas_rl.bench.common import load_model
    from atlas_rl.bench.grid import speculator_factories
    from atlas_rl.bench.tail import held_out_prompt_ids
    from atlas_rl.rollout.build import build_engine
    from atlas_rl.types import SamplingParams

    model, tok = load_model(None)
    ids = held_out_prompt_ids(tok, prompts, seed=0)
    factories = speculator_factories(model, ("auto",))
    table: dict = {"speculators": list(factories), "prompts": prompts, "new_tokens": new_tokens, "cells": []}
    for temp in (0.0, 1.0):
        for k in ks:
            eng = build_engine(model, [m() for m in factories.values()], k=k, controller="fixed", eos_token_ids=[])
            sp = SamplingParams(temperature=temp, max_new_tokens=new_tokens, ignore_eos=True, seed=0)
            st = eng.generate(ids, sp).stats
            table["cells"].append({"temperature": temp, "k": k, "tau": st.mean_acceptance_length})
            logger.info("T=%g k=%d: tau %.3f", temp, k, st.mean_acceptance_length)
            out.write_text(json.dumps(table, indent=1))
    return table


def _tau(table: dict, temp: float, k: int) -> float | None:
    for c in table["cells"]:
        if c["temperature"] == temp and c["k"] == k:
            return c["tau"]
    return None


def _forward_ratio(costs: dict, rows: int, k: int) -> float | None:
    fm = costs.get("forward_ms", {})
    one, more = fm.get(f"{rows}x1"), fm.get(f"{rows}x{k + 1}")
    return None if one is None or more is None else one / more


def _requested(run: dict) -> bool:
    """Whether the run's engine was asked for CUDA graphs (runs from before graphs existed: no)."""
    return bool(run.get("graphs_requested", False))


def _pair(run: dict) -> tuple[float, int, bool]:
    """What a speculating run is compared on: its plain run at the same T, rows and graph setting."""
    return run["temperature"], run["rows"], _requested(run)


def project_shape(entry: dict, table: dict) -> list[dict]:
    """One line per (T, rows, k>0) with a measured speculating step: τ, step ratio, projected speed-ups."""
    from atlas_rl.bench.gpu_costs import spec_runs

    lines = []
    # a run whose graphs were asked for but not replayed (a failed capture) measured another configuration: left out
    runs = [d for d in spec_runs(entry) if _requested(d) == bool(d.get("graphs", False))]
    plain = {_pair(d): d for d in runs if d["k"] == 0}
    for d in sorted(runs, key=lambda d: (d["temperature"], d["rows"], not _requested(d), d["k"])):
        base, tau = plain.get(_pair(d)), _tau(table, d["temperature"], d["k"])
        if d["k"] == 0 or base is None or tau is None:
            continue
        fwd = _forward_ratio(entry.get("costs", {}), d["rows"], d["k"])
        lines.append(
            {
                "temperature": d["temperature"],
                "rows": d["rows"],
                "k": d["k"],
                "graphs": bool(d.get("graphs", False)),
                "tau": tau,
                "step_ratio": d["step_ms"] / base["step_ms"],
                "speedup": tau * base["step_ms"] / d["step_ms"],
                "speedup_forward_only": None if fwd is None else tau * fwd,
                "draft_share": d["propose_ms"] / d["step_ms"],
            }
        )
    return lines


def render_projection(costs: dict, table: dict) -> str:
    out = [f"# Projected speed-up of speculation on {costs['device']} ({costs['dtype']})", ""]
    out.append(
        f"τ measured on the CPU: {table['prompts']} held-out prompts, {table['new_tokens']} new tokens, "
        f"best of {', '.join(table['speculators'])} at fixed k."
    )
    for name, entry in costs["shapes"].items():
        out += ["", f"## {name}", ""]
        out.append("| T | rows | k | graphs | τ | step vs k=0 | drafting share | speed-up | forward only |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for p in project_shape(entry, table):
            fwd = "n/a" if p["speedup_forward_only"] is None else f"{p['speedup_forward_only']:.2f}x"
            graphs = "yes" if p["graphs"] else "no"
            out.append(
                f"| {p['temperature']:g} | {p['rows']} | {p['k']} | {graphs} | {p['tau']:.2f} | "
                f"{p['step_ratio']:.2f}x | {p['draft_share']:.0%} | **{p['speedup']:.2f}x** | {fwd} |"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tau", help="Measure τ per temperature and draft length here (CPU).")
    t.add_argument("--out", required=True, help="JSON file to write.")
    t.add_argument("--prompts", type=int, default=16, help="Held-out prompts (rows of each call).")
    t.add_argument("--new-tokens", type=int, default=128, help="New tokens per prompt.")
    t.add_argument("--ks", default=",".join(map(str, TAU_KS)), help="Comma-separated fixed draft lengths.")
    j = sub.add_parser("project", help="Combine a device's gpu_costs.json with a τ table.")
    j.add_argument("--costs", required=True, help="gpu_costs.json from atlas_rl.bench.gpu_costs.")
    j.add_argument("--tau", required=True, help="The τ table from the tau command.")
    j.add_argument("--out", required=True, help="Markdown file to write.")
    a = p.parse_args(argv)
    if a.cmd == "tau":
        ks = tuple(int(k) for k in a.ks.split(",") if k.strip().isdigit())
        if a.prompts < 1 or a.new_tokens < 2 or not ks or min(ks) < 1 or len(ks) != len(a.ks.split(",")):
            p.error("--prompts must be >= 1, --new-tokens >= 2 and --ks integers >= 1")
        measure_tau(Path(a.out), a.prompts, a.new_tokens, ks)
        return 0
    for f in (a.costs, a.tau):
        if not Path(f).is_file():
            p.error(f"no such file: {f}")
    costs, table = json.loads(Path(a.costs).read_text()), json.loads(Path(a.tau).read_text())
    Path(a.out).write_text(render_projection(costs, table))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
