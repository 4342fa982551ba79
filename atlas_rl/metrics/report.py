"""Rollout throughput reports from a run directory: ``report.json``, ``report.md`` and a self-contained
``report.html`` (plots embedded as PNG).

A run directory holds ``run.json`` (what ran: model, backend, options, command) and ``metrics.jsonl`` (one JSON
object per logged training step, TRL's log entries incl. the ``atlas/*`` metrics), as written by
:class:`atlas_rl.trainers.recorder.RunRecorder`. The speed-up is always paired: the baseline (the same engine
without speculation, on the same prompts, seed and policy version) is measured in the same run
(``atlas_baseline_every``).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import statistics
from pathlib import Path
from typing import Any

from atlas_rl.jsonio import write_json

from .runlog import RunLog, RunLogError, read_run, series

logger = logging.getLogger(__name__)

HEADLINE_FIELDS = (
    "steps",
    "speedup",
    "baseline",
    "rollout_tokens_per_s",
    "baseline_rollout_tokens_per_s",
    "mean_acceptance_length",
    "spec_off_fraction",
    "rollout_s_total",
    "step_time_s_mean",
    "reward_first",
    "reward_last",
)


# the TRL metric names AtlasPPOTrainer logs: a per-step series and table when a run has them
PPO_KEYS = (
    "objective/scores",
    "objective/kl",
    "objective/entropy",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
)

BASELINE = "the same engine without speculation, same prompts, seeds and policy version, measured in this run"


ReportError = RunLogError  # a run directory that cannot be reported on (missing, or without metrics)
Run = RunLog
load_run = read_run
_series = series


def _finite(xs: list[float]) -> list[float]:
    return [x for x in xs if x is not None and math.isfinite(x)]


def _median(xs: list[float]) -> float:
    xs = _finite(xs)
    return statistics.median(xs) if xs else math.nan


def _mean(xs: list[float]) -> float:
    xs = _finite(xs)
    return sum(xs) / len(xs) if xs else math.nan


def _per_speculator(series: dict[str, list[float]], name: str) -> dict[str, float]:
    out = {
        "share": _mean(series[f"share/{name}"]),
        "mean_acceptance_length": _mean(series[f"mean_acceptance_length/{name}"]),
    }
    est = _finite(series.get(f"estimated_acceptance_length/{name}", []))
    if est:  # a draft head's estimated T=1 acceptance on the first and the last rollout
        out["estimated_acceptance_length_first"] = est[0]
        out["estimated_acceptance_length_last"] = est[-1]
    return out


def summarize(run: Run) -> dict[str, Any]:
    """Per-step series and the headline figures of a run."""
    steps = run.steps
    keys = sorted({k for s in steps for k in s})
    specs = sorted({k.split("/", 2)[2] for k in keys if k.startswith("atlas/speculator_share/")})
    probed = sorted({k.split("/", 2)[2] for k in keys if k.startswith("atlas/estimated_acceptance_length/")})
    khist = sorted({int(k.rsplit("/", 1)[1]) for k in keys if k.startswith("atlas/k_hist/")})
    series: dict[str, list[float]] = {
        "step": [float(s["step"]) for s in steps],
        "rollout_tokens_per_s": _series(steps, "atlas/rollout_tokens_per_s"),
        "baseline_rollout_tokens_per_s": _series(steps, "atlas/baseline_rollout_tokens_per_s"),
        "speedup": _series(steps, "atlas/speedup"),
        "rollout_s": _series(steps, "atlas/rollout_s"),
        "mean_acceptance_length": _series(steps, "atlas/mean_acceptance_length"),
        "spec_off_fraction": _series(steps, "atlas/spec_off_fraction"),
        "speculator_train_loss": _series(steps, "atlas/speculator_train_loss"),
        "speculator_staleness": _series(steps, "atlas/speculator_staleness"),
        "speculator_train_s": _series(steps, "atlas/speculator_train_s"),
        "reward": _series(steps, "reward"),
        "step_time": _series(steps, "step_time"),
    }
    series.update({k: _series(steps, k) for k in PPO_KEYS if any(k in st for st in steps)})
    for name in specs:
        series[f"share/{name}"] = _series(steps, f"atlas/speculator_share/{name}")
        series[f"mean_acceptance_length/{name}"] = _series(steps, f"atlas/mean_acceptance_length/{name}")
    for name in probed:  # draft heads replayed on each rollout's captured completions (no target forward)
        series[f"estimated_acceptance_length/{name}"] = _series(steps, f"atlas/estimated_acceptance_length/{name}")
    k_total = {k: sum(_finite(_series(steps, f"atlas/k_hist/{k}"))) for k in khist}
    rewards = _finite(series["reward"])
    headline = {
        "steps": len(steps),
        "speedup": _median(series["speedup"]),
        "baseline": BASELINE,
        "rollout_tokens_per_s": _median(series["rollout_tokens_per_s"]),
        "baseline_rollout_tokens_per_s": _median(series["baseline_rollout_tokens_per_s"]),
        "mean_acceptance_length": _mean(series["mean_acceptance_length"]),
        "spec_off_fraction": _mean(series["spec_off_fraction"]),
        "rollout_s_total": sum(_finite(series["rollout_s"])),
        "step_time_s_mean": _mean(series["step_time"]),
        "reward_first": rewards[0] if rewards else math.nan,
        "reward_last": rewards[-1] if rewards else math.nan,
        "per_speculator": {name: _per_speculator(series, name) for name in specs},
        "k_histogram": {str(k): v for k, v in k_total.items()},
    }
    return {"meta": run.meta, "headline": headline, "series": series, "speculators": specs, "probed": probed}


# ------------------------------------------------------------------------------------------------ plots
def _plots(summary: dict[str, Any]) -> dict[str, str]:
    """Title -> base64 PNG of each plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary["series"]
    x = s["step"]
    out: dict[str, str] = {}

    def fig_to_b64(fig) -> str:
        for a in fig.axes:
            if a.get_xlabel() == "step":
                a.xaxis.get_major_locator().set_params(integer=True)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(x, s["rollout_tokens_per_s"], "o-", label="atlas")
    if _finite(s["baseline_rollout_tokens_per_s"]):
        ax.plot(x, s["baseline_rollout_tokens_per_s"], "s--", label="no speculation (same run)")
    ax.set(xlabel="step", ylabel="rollout tokens/s", title="Rollout throughput")
    ax.legend()
    out["Rollout throughput per step"] = fig_to_b64(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(x, s["mean_acceptance_length"], "o-", label="all", color="black")
    for name in summary["speculators"]:
        ax.plot(x, s[f"mean_acceptance_length/{name}"], ".-", label=name)
    for name in summary.get("probed", []):
        ax.plot(x, s[f"estimated_acceptance_length/{name}"], "x:", label=f"{name} (estimated, T=1)")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set(xlabel="step", ylabel="tokens per target forward", title="Mean acceptance length")
    ax.legend()
    out["Mean acceptance length per speculator"] = fig_to_b64(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.4))
    bottom = [0.0] * len(x)
    for name in summary["speculators"]:
        vals = [0.0 if math.isnan(v) else v for v in s[f"share/{name}"]]
        axes[0].bar(x, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    off = [0.0 if math.isnan(v) else v for v in s["spec_off_fraction"]]
    axes[0].bar(x, off, bottom=bottom, label="off", color="lightgrey")
    axes[0].set(xlabel="step", ylabel="share of row-steps", title="Controller choices")
    axes[0].legend(fontsize=7)
    kh = summary["headline"]["k_histogram"]
    if kh:
        axes[1].bar([int(k) for k in kh], list(kh.values()))
    axes[1].set(xlabel="longest draft in a step (k)", ylabel="share of decode steps (summed)", title="Chosen k")
    axes[1].xaxis.get_major_locator().set_params(integer=True)
    out["Controller choices and k histogram"] = fig_to_b64(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(x, s["speculator_train_loss"], "o-", label="train loss")
    ax.set(xlabel="step", ylabel="loss", title="Adaptive speculator training")
    ax2 = ax.twinx()
    ax2.plot(x, s["speculator_staleness"], "s--", color="tab:red", label="staleness")
    ax2.set_ylabel("staleness (policy versions)")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    out["Speculator training loss and staleness"] = fig_to_b64(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(x, s["reward"], "o-")
    ax.set(xlabel="step", ylabel="mean reward", title="Reward")
    out["Reward curve"] = fig_to_b64(fig)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.3g}"
    return html.escape(str(v))


def render_markdown(summary: dict[str, Any]) -> str:
    h = summary["headline"]
    meta = summary["meta"]
    lines = [f"# atlas-rl run report — {meta.get('name', '')}", ""]
    if meta:
        lines += [
            f"- model: {meta.get('model', '?')}",
            f"- backend: {meta.get('generation_backend', '?')}",
            f"- command: `{meta.get('command', '?')}`",
            "",
        ]
    lines += ["| headline | value |", "|---|---|"]
    for k in HEADLINE_FIELDS:
        lines.append(f"| {k} | {_fmt(h.get(k))} |")
    lines += [
        "",
        "| speculator | share of row-steps | mean acceptance length | estimated τ (T=1), first → last rollout |",
        "|---|---|---|---|",
    ]
    for name, v in h["per_speculator"].items():
        est = (
            f"{_fmt(v['estimated_acceptance_length_first'])} → {_fmt(v['estimated_acceptance_length_last'])}"
            if "estimated_acceptance_length_first" in v
            else "—"
        )
        lines.append(f"| {name} | {_fmt(v['share'])} | {_fmt(v['mean_acceptance_length'])} | {est} |")
    s = summary["series"]
    lines += [
        "",
        "| step | tok/s atlas | tok/s baseline | speed-up | τ | spec off | reward |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, st in enumerate(s["step"]):
        lines.append(
            f"| {int(st)} | {_fmt(s['rollout_tokens_per_s'][i])} | {_fmt(s['baseline_rollout_tokens_per_s'][i])} | "
            f"{_fmt(s['speedup'][i])} | {_fmt(s['mean_acceptance_length'][i])} | {_fmt(s['spec_off_fraction'][i])} | "
            f"{_fmt(s['reward'][i])} |"
        )
    ppo = [k for k in PPO_KEYS if k in s]
    if ppo:
        lines += ["", "| step | " + " | ".join(ppo) + " |", "|---" * (len(ppo) + 1) + "|"]
        lines += [f"| {int(st)} | " + " | ".join(_fmt(s[k][i]) for k in ppo) + " |" for i, st in enumerate(s["step"])]
    return "\n".join(lines) + "\n"


def render_html(summary: dict[str, Any], plots: dict[str, str]) -> str:
    h = summary["headline"]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(h.get(k))}</td></tr>" for k in HEADLINE_FIELDS)
    figs = "".join(
        f'<figure><img class="plot" alt="{html.escape(t)}" src="data:image/png;base64,{b}"/>'
        f"<figcaption>{html.escape(t)}</figcaption></figure>"
        for t, b in plots.items()
    )
    title = html.escape(f"atlas-rl run report — {summary['meta'].get('name', '')}")
    # the script marks how many plots decoded (read back by the headless-browser test)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:auto}}table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left}}figure{{display:inline-block;margin:8px}}</style>
</head><body><h1>{title}</h1>
<p>Speed-up: atlas rollout tokens/s over the same engine without speculation, same prompts, seeds and policy
version, measured in this run (median over steps).</p>
<table>{rows}</table>{figs}
<script>
window.addEventListener("load", function () {{
  var imgs = document.querySelectorAll("img.plot"), ok = 0;
  imgs.forEach(function (im) {{ if (im.complete && im.naturalWidth > 0) ok++; }});
  document.body.setAttribute("data-plots", ok + "/" + imgs.length);
}});
</script></body></html>
"""


def write_report(run_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and report.html into the run directory; returns their paths."""
    run = load_run(run_dir)
    summary = summarize(run)
    d = run.directory
    paths = {"json": d / "report.json", "md": d / "report.md", "html": d / "report.html"}
    write_json(paths["json"], summary)
    paths["md"].write_text(render_markdown(summary))
    paths["html"].write_text(render_html(summary, _plots(summary)))
    return paths
