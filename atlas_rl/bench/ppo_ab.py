"""Side-by-side table of two PPO runs (``recipes/ppo.py`` run directories), e.g. atlas vs transformers:

    python -m atlas_rl.bench.ppo_ab --a runs/ppo_ab_atlas --b runs/ppo_ab_transformers --out docs/results/ppo_ab.md

Per step: rollout seconds, mean acceptance length (τ, atlas only), reward and KL of both runs, and step seconds;
then the ratios of the medians (rollout, whole step) and of the totals.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("atlas/rollout_s", "atlas/mean_acceptance_length", "objective/scores", "objective/kl", "step_time")


def load_steps(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(run.json, one record per PPO step)`` of a run directory."""
    d = Path(run_dir)
    mfile = d / "metrics.jsonl"
    if not mfile.exists():
        raise ValueError(f"{mfile} does not exist: give a run directory written by recipes/ppo.py")
    steps = [json.loads(line) for line in mfile.read_text().splitlines() if line.strip()]
    steps = [s for s in steps if "objective/scores" in s]
    if not steps:
        raise ValueError(f"{mfile} holds no PPO steps")
    meta = json.loads((d / "run.json").read_text()) if (d / "run.json").exists() else {}
    return meta, steps


def _get(step: dict[str, Any], key: str) -> float:
    v = step.get(key)
    return float(v) if isinstance(v, (int, float)) else math.nan


def _f(v: float, digits: int = 3) -> str:
    return "—" if math.isnan(v) else f"{v:.{digits}g}"


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(xs) if xs else math.nan


def compare(a: list[dict[str, Any]], b: list[dict[str, Any]], la: str, lb: str) -> str:
    """The markdown table and the ratio lines (``b / a`` for times: > 1 means ``a`` is faster)."""
    head = (
        f"| step | rollout s {la} | rollout s {lb} | τ {la} | reward {la} | reward {lb} | KL {la} | KL {lb} "
        f"| step s {la} | step s {lb} |"
    )
    lines = [head, "|---" * 10 + "|"]
    for sa, sb in zip(a, b):
        vals = [_get(sa, "atlas/rollout_s"), _get(sb, "atlas/rollout_s"), _get(sa, "atlas/mean_acceptance_length")]
        vals += [_get(sa, "objective/scores"), _get(sb, "objective/scores")]
        vals += [_get(sa, "objective/kl"), _get(sb, "objective/kl"), _get(sa, "step_time"), _get(sb, "step_time")]
        lines.append(f"| {int(sa['step'])} | " + " | ".join(_f(v) for v in vals) + " |")
    out = {}
    for key in ("atlas/rollout_s", "step_time"):
        ma, mb = _median([_get(s, key) for s in a]), _median([_get(s, key) for s in b])
        ta, tb = sum(_get(s, key) for s in a), sum(_get(s, key) for s in b)
        out[key] = (ma, mb, ta, tb)
    taus = [_get(s, "atlas/mean_acceptance_length") for s in a]
    ra, sa_ = out["atlas/rollout_s"], out["step_time"]
    lines += [
        "",
        f"- rollout time per step, median: {la} {_f(ra[0])} s, {lb} {_f(ra[1])} s → {lb}/{la} = "
        f"**{_f(ra[1] / ra[0])}×** (totals {_f(ra[2])} s vs {_f(ra[3])} s: {_f(ra[3] / ra[2])}×)",
        f"- whole step time, median: {la} {_f(sa_[0])} s, {lb} {_f(sa_[1])} s → {lb}/{la} = "
        f"**{_f(sa_[1] / sa_[0])}×** (totals {_f(sa_[2])} s vs {_f(sa_[3])} s: {_f(sa_[3] / sa_[2])}×)",
        f"- mean acceptance length τ ({la}): mean {_f(_mean(taus))}",
        f"- mean reward: {la} {_f(_mean([_get(s, 'objective/scores') for s in a]))}, "
        f"{lb} {_f(_mean([_get(s, 'objective/scores') for s in b]))}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="run directory of the first backend (e.g. atlas)")
    p.add_argument("--b", required=True, help="run directory of the second backend (e.g. transformers)")
    p.add_argument("--out", default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    try:
        (ma, a), (mb, b) = load_steps(args.a), load_steps(args.b)
    except ValueError as e:
        p.error(str(e))
    la, lb = ma.get("generation_backend", "a"), mb.get("generation_backend", "b")
    text = compare(a, b, la, lb)
    sys.stdout.write(text + "\n")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
