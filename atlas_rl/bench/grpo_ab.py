"""Compare GRPO runs of two generation backends over several seeds: rollout and step time, reward curves.

Usage (run directories written by ``recipes/grpo.py``; any number of seeds per backend)::

    python -m atlas_rl.bench.grpo_ab --a runs/grpo_atlas runs/grpo_atlas_s1 \
        --b runs/grpo_transformers runs/grpo_transformers_s1 --out docs/results/grpo_ab.md

Speed: ratios of summed rollout seconds, of rollout tokens/s (the backends' completions differ in length once the
runs diverge, so tokens/s is the fair rate) and of summed step seconds, per seed and over all seeds.

"Speculation must not change learning": each run is one sample of a noisy learning curve (sampling, data order),
so the backends are compared against the spread between seeds of the same backend. Per run, the mean over its
steps of reward, policy entropy and completion length; Welch's t-test between the backends' run means (two
seeds or more per side); and, for the reward, the pooled per-step band (min..max over seeds) of each backend.
Needs scipy (the ``dev`` extra).
"""

from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlas_rl.argparsing import ConfigParser
from atlas_rl.metrics.runlog import read_run, series

FIELDS = {
    "reward": "reward",
    "entropy": "entropy",
    "length": "completions/mean_length",
    "rollout_s": "atlas/rollout_s",
    "step_s": "step_time",
    "tok_s": "atlas/rollout_tokens_per_s",
}


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Per-step series of one run directory (its training-step records, :func:`atlas_rl.metrics.runlog.read_run`)."""
    run = read_run(run_dir)
    d, meta, steps = run.directory, run.meta, run.steps
    out: dict[str, Any] = {"name": d.name, "meta": meta, "n": len(steps)}
    for key, name in FIELDS.items():
        out[key] = series(steps, name)
    out["tokens"] = [r * t for r, t in zip(out["rollout_s"], out["tok_s"])]
    est = sorted({k.split("/", 2)[2] for s in steps for k in s if k.startswith("atlas/estimated_acceptance_length/")})
    out["estimated"] = {name: series(steps, f"atlas/estimated_acceptance_length/{name}") for name in est}
    out["tau"] = series(steps, "atlas/mean_acceptance_length")
    out["spec_off"] = series(steps, "atlas/spec_off_fraction")
    return out


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _welch(a: list[float], b: list[float]) -> float:
    if len(a) < 2 or len(b) < 2:
        return math.nan
    from scipy import stats

    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _tot(r: dict[str, Any], key: str, n: int) -> float:
    return sum(r[key][:n])


def _speed(runs_a: list[dict[str, Any]], runs_b: list[dict[str, Any]], la: str, lb: str, n: int) -> list[str]:
    lines = [
        "### Speed",
        "",
        f"| run pair | rollout s {lb} / {la} | rollout tok/s {la} / {lb} | step s {lb} / {la} |",
        "|---|---|---|---|",
    ]
    for ra, rb in zip(runs_a, runs_b):
        ta, tb = ({k: _tot(r, k, n) for k in ("rollout_s", "tokens", "step_s")} for r in (ra, rb))
        lines.append(
            f"| {ra['name']} / {rb['name']} | {tb['rollout_s'] / ta['rollout_s']:.2f} | "
            f"{(ta['tokens'] / ta['rollout_s']) / (tb['tokens'] / tb['rollout_s']):.2f} | "
            f"{tb['step_s'] / ta['step_s']:.2f} |"
        )
    sa = {k: sum(_tot(r, k, n) for r in runs_a) for k in ("rollout_s", "tokens", "step_s")}
    sb = {k: sum(_tot(r, k, n) for r in runs_b) for k in ("rollout_s", "tokens", "step_s")}
    lines.append(
        f"| **all** | **{sb['rollout_s'] / sa['rollout_s']:.2f}** | "
        f"**{(sa['tokens'] / sa['rollout_s']) / (sb['tokens'] / sb['rollout_s']):.2f}** | "
        f"**{sb['step_s'] / sa['step_s']:.2f}** |"
    )
    return lines + [
        "",
        f"Totals: rollout {sa['rollout_s']:.0f} s ({la}) vs {sb['rollout_s']:.0f} s ({lb}); "
        f"rollout tokens/s {sa['tokens'] / sa['rollout_s']:.1f} vs {sb['tokens'] / sb['rollout_s']:.1f}; "
        f"whole steps {sa['step_s']:.0f} s vs {sb['step_s']:.0f} s.",
    ]


def _learning(runs_a: list[dict[str, Any]], runs_b: list[dict[str, Any]], la: str, lb: str, n: int) -> list[str]:
    lines = [
        "### Learning (per run: mean over its steps)",
        "",
        f"| quantity | {la} runs | {lb} runs | {la} mean | {lb} mean | Welch p |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("reward", "entropy", "length"):
        ma = [_mean(r[key][:n]) for r in runs_a]
        mb = [_mean(r[key][:n]) for r in runs_b]
        lines.append(
            f"| {key} | {', '.join(f'{x:.3f}' for x in ma)} | {', '.join(f'{x:.3f}' for x in mb)} | "
            f"{_mean(ma):.3f} | {_mean(mb):.3f} | {_welch(ma, mb):.2f} |"
        )
    return lines


def _cell(runs: list[dict[str, Any]], key: str, i: int, fmt: str) -> str:
    xs = [r[key][i] for r in runs]
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.fmean(xs), fmt)} [{format(min(xs), fmt)}..{format(max(xs), fmt)}]"


def _per_step(runs_a: list[dict[str, Any]], runs_b: list[dict[str, Any]], la: str, lb: str, n: int) -> list[str]:
    lines = [
        "### Per step (mean over seeds, min..max in brackets)",
        "",
        f"| step | reward {la} | reward {lb} | entropy {la} | entropy {lb} | rollout s {la} | rollout s {lb} |",
        "|---|---|---|---|---|---|---|",
    ]
    for i in range(n):
        lines.append(
            f"| {i + 1} | {_cell(runs_a, 'reward', i, '.3f')} | {_cell(runs_b, 'reward', i, '.3f')} | "
            f"{_cell(runs_a, 'entropy', i, '.2f')} | {_cell(runs_b, 'entropy', i, '.2f')} | "
            f"{_cell(runs_a, 'rollout_s', i, '.0f')} | {_cell(runs_b, 'rollout_s', i, '.0f')} |"
        )
    return lines


def _heads(runs: list[dict[str, Any]], n: int) -> list[str]:
    probed = [r for r in runs if r["estimated"]]
    if not probed:
        return []
    lines = ["", "### Draft heads as the policy moves (estimated T=1 acceptance length on each rollout)", ""]
    for r in probed:
        names = sorted(r["estimated"])
        lines += [
            f"{r['name']}: measured τ {_mean(r['tau'][:n]):.2f}, spec-off share {_mean(r['spec_off'][:n]):.2f}",
            "",
            "| step | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for i in range(n):
            lines.append(f"| {i + 1} | " + " | ".join(f"{r['estimated'][m][i]:.3f}" for m in names) + " |")
        lines.append("")
    return lines


def compare(runs_a: list[dict[str, Any]], runs_b: list[dict[str, Any]], label_a: str, label_b: str) -> str:
    """The markdown comparison of two backends' runs over their first common steps (module docstring)."""
    n = min(r["n"] for r in runs_a + runs_b)
    lines = [f"## {label_a} vs {label_b}: {len(runs_a)} vs {len(runs_b)} seeds, first {n} steps of each run", ""]
    lines += _speed(runs_a, runs_b, label_a, label_b, n) + [""]
    lines += _learning(runs_a, runs_b, label_a, label_b, n) + [""]
    lines += _per_step(runs_a, runs_b, label_a, label_b, n)
    lines += _heads(runs_a + runs_b, n)
    return "\n".join(lines) + "\n"


@dataclass
class GrpoAbOptions:
    a: list[str] = field(metadata={"help": "Run directories of backend A (e.g. atlas), one per seed."})
    b: list[str] = field(metadata={"help": "Run directories of backend B (e.g. transformers), one per seed."})
    label_a: str | None = field(default=None, metadata={"help": "Name of backend A (default: from run.json)."})
    label_b: str | None = field(default=None, metadata={"help": "Name of backend B (default: from run.json)."})
    out: str | None = field(default=None, metadata={"help": "Also write the markdown here."})


def main(argv: list[str] | None = None) -> int:
    p = ConfigParser([GrpoAbOptions], prog="python -m atlas_rl.bench.grpo_ab", description=__doc__)
    args = p.parse(argv)
    try:
        runs_a = [load_run(d) for d in args.a]
        runs_b = [load_run(d) for d in args.b]
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    la = args.label_a or runs_a[0]["meta"].get("generation_backend", "A")
    lb = args.label_b or runs_b[0]["meta"].get("generation_backend", "B")
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    text = f"Command: `python -m atlas_rl.bench.grpo_ab {cmd}`\n\n" + compare(runs_a, runs_b, la, lb)
    if args.out:
        Path(args.out).write_text(text)
    sys.stdout.write(text)  # a command-line report
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
