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
    "speedup_ci",
    "speedup_disturbed_steps",
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

PHASES = ("prefill", "propose", "forward", "verify", "plan", "capture")
BASELINE = "the same engine without speculation, same prompts, seeds and policy version, measured in this run"


ReportError = RunLogError  # a run directory that cannot be reported on (missing, or without metrics)
Run = RunLog
load_run = read_run
_series = series


def median_ci(xs: list[float], level: float = 0.9) -> tuple[float, float, float]:
    """A distribution-free confidence interval of the median from order statistics: ``(low, high, coverage)``,
    the narrowest ``(x_(k), x_(n+1-k))`` whose binomial coverage is at least ``level`` (NaNs when n < 2)."""
    xs = sorted(_finite(xs))
    n = len(xs)
    if n < 2:
        return math.nan, math.nan, math.nan
    best = (xs[0], xs[-1], 1.0 - 2 * 0.5**n)
    for k in range(2, n // 2 + 1):
        coverage = 1.0 - 2 * sum(math.comb(n, i) for i in range(k)) * 0.5**n
        if coverage < level:
            break
        best = (xs[k - 1], xs[n - k], coverage)
    return best


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
        "speedup_disturbed": _series(steps, "atlas/speedup_disturbed"),
    }
    series.update({k: _series(steps, k) for k in PPO_KEYS if any(k in st for st in steps)})
    for key in keys:
        if key.startswith("rewards/") and key.endswith("/mean"):  # one curve per reward function
            series[key] = _series(steps, key)
    for phase in PHASES:
        series[f"phase/{phase}"] = _series(steps, f"atlas/rollout_{phase}_s")
    for name in specs:
        series[f"share/{name}"] = _series(steps, f"atlas/speculator_share/{name}")
        series[f"mean_acceptance_length/{name}"] = _series(steps, f"atlas/mean_acceptance_length/{name}")
    for name in probed:  # draft heads replayed on each rollout's captured completions (no target forward)
        series[f"estimated_acceptance_length/{name}"] = _series(steps, f"atlas/estimated_acceptance_length/{name}")
    k_total = {k: sum(_finite(_series(steps, f"atlas/k_hist/{k}"))) for k in khist}
    rewards = _finite(series["reward"])
    headline = {
        "steps": len(steps),
        **_speedup_headline(series),
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
    return {
        "meta": run.meta,
        "headline": headline,
        "series": series,
        "speculators": specs,
        "probed": probed,
        "traces": {str(k): v for k, v in sorted(run.traces.items())},
    }


def _speedup_headline(series: dict[str, list[float]]) -> dict[str, Any]:
    """The median paired speed-up over the steps whose measurement was not disturbed, with its interval."""
    clean = [v for v, d in zip(series["speedup"], series["speedup_disturbed"]) if not d == 1.0]
    disturbed = [int(st) for st, d in zip(series["step"], series["speedup_disturbed"]) if d == 1.0]
    lo, hi, coverage = median_ci(clean)
    return {
        "speedup": _median(clean),
        "speedup_ci": f"[{lo:.2f}, {hi:.2f}] ({100 * coverage:.0f}% CI of the median, {len(_finite(clean))} steps)"
        if math.isfinite(lo)
        else "n/a (fewer than 2 undisturbed steps)",
        "speedup_disturbed_steps": ", ".join(map(str, disturbed)) if disturbed else "none",
    }


# ------------------------------------------------------------------------------------------------ plots
def _plots(summary: dict[str, Any]) -> dict[str, str]:
    """Title -> base64 PNG of each plot (none without matplotlib, the ``report`` extra: the tables still render)."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("report.html without plots: matplotlib is not installed (pip install 'atlas-rl[report]')")
        return {}

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def fig_to_b64(fig) -> str:
        for a in fig.axes:
            if a.get_xlabel() == "step":
                a.xaxis.get_major_locator().set_params(integer=True)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    figures = [
        ("Rollout throughput per step", _throughput_figure),
        ("Mean acceptance length per speculator", _acceptance_figure),
        ("Controller choices and k histogram", _controller_figure),
        ("Speculator training loss and staleness", _training_figure),
        ("Reward curve", _reward_figure),
        ("Where the rollout time went", _phase_figure),
    ]
    if summary.get("traces"):
        figures.append(("Active rows over decode steps", lambda p, sm: _trace_figure(p, sm["traces"])))
    return {title: fig_to_b64(build(plt, summary)) for title, build in figures}


def _throughput_figure(plt: Any, summary: dict[str, Any]) -> Any:
    s = summary["series"]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(s["step"], s["rollout_tokens_per_s"], "o-", label="atlas")
    if _finite(s["baseline_rollout_tokens_per_s"]):
        ax.plot(s["step"], s["baseline_rollout_tokens_per_s"], "s--", label="no speculation (same run)")
    ax.set(xlabel="step", ylabel="rollout tokens/s", title="Rollout throughput")
    ax.legend()
    return fig


def _acceptance_figure(plt: Any, summary: dict[str, Any]) -> Any:
    s = summary["series"]
    x = s["step"]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(x, s["mean_acceptance_length"], "o-", label="all", color="black")
    for name in summary["speculators"]:
        ax.plot(x, s[f"mean_acceptance_length/{name}"], ".-", label=name)
    for name in summary.get("probed", []):
        ax.plot(x, s[f"estimated_acceptance_length/{name}"], "x:", label=f"{name} (estimated, T=1)")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set(xlabel="step", ylabel="tokens per target forward", title="Mean acceptance length")
    ax.legend()
    return fig


def _controller_figure(plt: Any, summary: dict[str, Any]) -> Any:
    s = summary["series"]
    x = s["step"]
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
    return fig


def _training_figure(plt: Any, summary: dict[str, Any]) -> Any:
    s = summary["series"]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(s["step"], s["speculator_train_loss"], "o-", label="train loss")
    ax.set(xlabel="step", ylabel="loss", title="Adaptive speculator training")
    ax2 = ax.twinx()
    ax2.plot(s["step"], s["speculator_staleness"], "s--", color="tab:red", label="staleness")
    ax2.set_ylabel("staleness (policy versions)")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    return fig


def _reward_figure(plt: Any, summary: dict[str, Any]) -> Any:
    s = summary["series"]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(s["step"], s["reward"], "o-", color="black", label="reward (weighted sum)")
    for key in sorted(k for k in s if k.startswith("rewards/")):
        ax.plot(s["step"], s[key], ".--", label=key.split("/")[1])
    ax.set(xlabel="step", ylabel="mean reward", title="Reward")
    ax.legend(fontsize=7)
    return fig


def _phase_figure(plt: Any, summary: dict[str, Any]) -> Any:
    """Per step: seconds of each rollout phase (stacked) and the rest of the rollout's wall time."""
    s = summary["series"]
    x = s["step"]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    bottom = [0.0] * len(x)
    for phase in PHASES:
        vals = [0.0 if math.isnan(v) else v for v in s[f"phase/{phase}"]]
        ax.bar(x, vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    rest = [max(0.0, (0.0 if math.isnan(t) else t) - b) for t, b in zip(s["rollout_s"], bottom)]
    ax.bar(x, rest, bottom=bottom, label="other (sampling, bookkeeping)", color="lightgrey")
    ax.set(xlabel="step", ylabel="seconds", title="Rollout time by phase (atlas)")
    ax.legend(fontsize=7)
    return fig


def _trace_figure(plt: Any, traces: dict[str, dict[str, list[int]]]) -> Any:
    """Active rows at each decode step of the first and the last recorded rollout (each engine call, e.g. each
    interleaved half, its own line); dots where the step verified drafts (speculation on)."""
    keys = sorted(traces, key=int)
    picked = [keys[0]] if len(keys) == 1 else [keys[0], keys[-1]]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for key in picked:
        t = traces[key]
        segments = t.get("segments") or [len(t["rows"])]
        start = 0
        for j, n in enumerate(segments):
            rows, qlen = t["rows"][start : start + n], t["query_len"][start : start + n]
            start += n
            label = f"step {key}" + (f", call {j + 1}" if len(segments) > 1 else "")
            (line,) = ax.plot(range(len(rows)), rows, "-", label=label)
            on = [i for i, q in enumerate(qlen) if q > 1]
            ax.plot(on, [rows[i] for i in on], ".", color=line.get_color())
    ax.set(xlabel="decode step", ylabel="active rows", title="Active rows per decode step (dots: drafts verified)")
    ax.legend(fontsize=7)
    return fig


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.3g}"
    return html.escape(str(v))


def disturbed_warning(headline: dict[str, Any]) -> str | None:
    steps = headline.get("speedup_disturbed_steps")
    if not steps or steps == "none":
        return None
    return (
        f"the paired speed-up measurement of step(s) {steps} was disturbed (another process took CPU time, or the "
        "two interleaved halves disagreed); those steps are left out of the headline median."
    )


def render_markdown(summary: dict[str, Any]) -> str:
    h = summary["headline"]
    meta = summary["meta"]
    lines = [f"# atlas-rl run report — {meta.get('name', '')}", ""]
    if w := disturbed_warning(h):
        lines += [f"> **Warning:** {w}", ""]
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
    warning = f'<p class="warning"><b>Warning:</b> {html.escape(w)}</p>' if (w := disturbed_warning(h)) else ""
    # the script marks how many plots decoded (read back by the headless-browser test)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:auto}}table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left}}figure{{display:inline-block;margin:8px}}</style>
</head><body><h1>{title}</h1>
<p>Speed-up: atlas rollout tokens/s over the same engine without speculation, same prompts, seeds and policy
version, measured in this run, interleaved in halves within each step (median over undisturbed steps, with a
distribution-free confidence interval of the median).</p>
{warning}<table>{rows}</table>{figs}
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
