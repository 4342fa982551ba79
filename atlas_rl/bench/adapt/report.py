"""The adapt scenario's report: per-cell tables over windows, the retraining table, a speed-over-time SVG."""

from __future__ import annotations

import math
from typing import Any

from ..common import fmt
from .options import CONFIGS

__all__ = ["policy_summary", "render_adapt_markdown", "speed_svg", "summary"]

_COLORS = {"none": "#999999", "static": "#1f77b4", "suffix": "#2ca02c", "adaptive": "#d62728", "default": "#000000"}


def _cells(report: dict[str, Any]) -> list[str]:
    return list(report["windows"][0]["cells"]) if report.get("windows") else []


def policy_summary(records: list[dict[str, Any]]) -> dict[str, float]:
    """The policy part: adaptive / static τ over the last half of the steps (means of each), the largest share of
    a step spent retraining."""
    half = records[len(records) // 2 :]
    st = [r["tau"].get("static", math.nan) for r in half]
    ad = [r["tau"].get("adaptive", math.nan) for r in half]
    shares = [r["train_s"] / r["step_s"] for r in records if r["step_s"] > 0]
    return {
        "static_tau_last_half": sum(st) / len(st) if st else math.nan,
        "adaptive_tau_last_half": sum(ad) / len(ad) if ad else math.nan,
        "adaptive_over_static_last_half": (sum(ad) / sum(st)) if st and sum(st) else math.nan,
        "max_train_share_of_step": max(shares) if shares else math.nan,
    }


def _policy_lines(report: dict[str, Any]) -> list[str]:
    recs = report.get("policy")
    if not recs:
        return []
    o = report["options"]
    out = [
        "## Policy specialisation (GRPO)",
        "",
        f"{o['policy_steps']} GRPO steps (lr {o['policy_lr']:g}, 4 prompts x 4 samples, T=1) on one-shot ticket "
        "requests, reward = the share of format rules met minus text around the ticket; after every step "
        f"{o['probe_prompts']} held-out requests rolled out by the current policy with each head alone (k={o['k']}, "
        "T=1): τ measured, not estimated; the interval is a paired 95% bootstrap over the probe batches.",
        "",
        "| step | reward | static τ | adaptive τ | adaptive/static (95% CI) | default τ (the step's rollout) | "
        "retraining s | step s | retraining share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        st, ad = r["tau"].get("static", math.nan), r["tau"].get("adaptive", math.nan)
        out.append(
            f"| {r['step']} | {fmt(r['reward'])} | {fmt(st)} | {fmt(ad)} | {fmt(ad / st if st else math.nan)}×"
            f"{_ci(r['tau'].get('check'))} | "
            f"{fmt(r['default_tau'])} | {r['train_s']:.1f} | {r['step_s']:.1f} | "
            f"{100 * r['train_s'] / max(r['step_s'], 1e-9):.1f}% |"
        )
    s = policy_summary(recs)
    out += [
        "",
        f"- last half of the run: adaptive τ {fmt(s['adaptive_tau_last_half'])} vs static "
        f"{fmt(s['static_tau_last_half'])} = **{fmt(s['adaptive_over_static_last_half'])}×**; retraining at most "
        f"{100 * s['max_train_share_of_step']:.1f}% of a step",
        "",
    ]
    return out


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """Per cell: the best adaptive / static τ ratio within the windows, the last window's default / static speed,
    and the worst adaptive / static τ ratio at any window (the 'never below static' check)."""
    out: dict[str, Any] = {}
    for name in _cells(report):
        per_w = [w["cells"][name] for w in report["windows"]]
        tau_ratio = [c["adaptive"]["tau"] / c["static"]["tau"] for c in per_w]
        speed = [c["default"]["tokens_per_s"] / c["static"]["tokens_per_s"] for c in per_w]
        out[name] = {
            "adaptive_over_static_tau_best": max(tau_ratio),
            "adaptive_over_static_tau_last": tau_ratio[-1],
            "adaptive_over_static_tau_worst": min(tau_ratio),
            "default_over_static_speed_last": speed[-1],
            "default_over_static_speed_worst": min(speed),
        }
    trains = [w["traffic"]["train_share"] for w in report["windows"] if "traffic" in w]
    out["max_train_share"] = max(trains) if trains else math.nan
    return out | _check_summary(report)


def _check_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The worst adaptive / static ratio of the T=1 check over the windows (measured with its interval, estimated)."""
    out: dict[str, Any] = {}
    checks = [w["tau_check"] for w in report["windows"] if w.get("tau_check")]
    measured = [c["measured"] for c in checks if "measured" in c]
    estimated = [c["estimated"]["ratio"] for c in checks if "estimated" in c]
    if measured:
        worst = min(measured, key=lambda m: m["ratio"])
        out["check_worst_measured"] = {"ratio": worst["ratio"], "ci_low": worst["ci_low"], "ci_high": worst["ci_high"]}
    if estimated:
        out["check_worst_estimated"] = min(estimated)
    return out


def _cell_table(report: dict[str, Any], name: str) -> list[str]:
    head = ["window"] + [f"{c} τ / tok/s" for c in CONFIGS] + ["adaptive/static τ", "default/static speed", "drafts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in report["windows"]:
        c = w["cells"][name]
        vals = [f"{fmt(c[k]['tau'])} / {fmt(c[k]['tokens_per_s'], 1)}" for k in CONFIGS]
        ratio = c["adaptive"]["tau"] / c["static"]["tau"]
        speed = c["default"]["tokens_per_s"] / c["static"]["tokens_per_s"]
        share = ", ".join(f"{n} {100 * v:.0f}%" for n, v in sorted(c["default"]["draft_share"].items()))
        lines.append("| " + " | ".join([f"w{w['window']}", *vals, f"{ratio:.2f}×", f"{speed:.2f}×", share]) + " |")
    return lines


def _ci(check: dict[str, float] | None) -> str:
    return f" ({check['ci_low']:.2f}–{check['ci_high']:.2f})" if check else ""


def _check_table(report: dict[str, Any]) -> list[str]:
    """The T=1 static-vs-adaptive τ check per window (tau_check.py)."""
    wins = [w for w in report["windows"] if w.get("tau_check")]
    if not wins:
        return []
    o = report["options"]
    lines = [
        "## Adaptive vs static τ at T=1, with enough tokens",
        "",
        f"Measured: {o['check_prompts']} held-out requests in batches of {o['check_rows']} rows, each head alone "
        f"(k={o['k']}, the same seeds), paired 95% bootstrap over the batches. Estimated: the closed-form expected "
        f"acceptance length of each head's {o['k']}-step chain on {o['estimate_prompts']} captured T=1 rollouts of "
        "the target (the same positions for both heads).",
        "",
        "| window | measured static τ | measured adaptive τ | adaptive/static (95% CI) | estimated static τ | "
        "estimated adaptive τ | estimated ratio | positions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in wins:
        m, e = w["tau_check"].get("measured"), w["tau_check"].get("estimated")
        mv = [fmt(m["tau_den"]), fmt(m["tau_num"]), f"{m['ratio']:.3f}×{_ci(m)}"] if m else ["–"] * 3
        ev = (
            [fmt(e["tau_static"]), fmt(e["tau_adaptive"]), f"{e['ratio']:.3f}×", str(e["positions"])]
            if e
            else ["–"] * 4
        )
        lines.append("| " + " | ".join([f"w{w['window']}", *mv, *ev]) + " |")
    return lines + [""]


def _traffic_table(report: dict[str, Any]) -> list[str]:
    lines = [
        "| window | traffic rollout s | traffic τ (default) | retraining s | share of rollout | optimizer steps | "
        "loss | staleness (versions) | published (guard) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for w in report["windows"]:
        t = w.get("traffic")
        if t is None:
            continue
        bad = " (bad head injected after)" if t.get("injected_bad_head") else ""
        lines.append(
            f"| w{w['window']}{bad} | {t['rollout_s']:.1f} | {fmt(t['tau'])} | {t['train_s']:.1f} | "
            f"{100 * t['train_share']:.1f}% | {t['steps']} | {fmt(t['loss'])} | {fmt(t['staleness'], 1)} | "
            f"{'yes' if t.get('published', 1.0) else 'no (kept the serving head)'} |"
        )
    return lines


def render_adapt_markdown(report: dict[str, Any]) -> str:
    o = report["options"]
    out = [f"# atlas-rl bench adapt — {report['model']} on {report['device']}", ""]
    if not report.get("windows"):
        return "\n".join(out + _policy_lines(report) + [f"Command: `{report['command']}`", ""])
    out += [
        f"Workload shift: {o['windows']} windows of {o['traffic_prompts']} bug reports answered in a project-specific "
        "ticket format the static head never saw (atlas_rl/data/adapt_tickets.json), captured at T=1; the adaptive "
        f"head retrained after each within {100 * o['adaptive_share']:.0f}% of the window's rollout time. Bench: "
        f"{o['bench_prompts']} held-out requests, {o['max_new_tokens']} new tokens, k={o['k']}, {o['repeats']} "
        "interleaved repeats; w0 = before any adaptation. τ = mean acceptance length; `default` = the production "
        "engine (auto controller over static + adaptive + suffix).",
        "",
    ]
    for name in _cells(report):
        c = report["windows"][0]["cells"][name]
        out += [f"## {c['rows']} active row(s), T={c['temperature']:g}", "", *_cell_table(report, name), ""]
    out += _check_table(report)
    out += ["## Traffic and retraining", "", *_traffic_table(report), ""]
    s = summary(report)
    for name in _cells(report):
        v = s[name]
        out.append(
            f"- {name}: adaptive/static τ best {v['adaptive_over_static_tau_best']:.2f}× (last "
            f"{v['adaptive_over_static_tau_last']:.2f}×, worst {v['adaptive_over_static_tau_worst']:.2f}×); "
            f"default/static speed last {v['default_over_static_speed_last']:.2f}× (worst "
            f"{v['default_over_static_speed_worst']:.2f}×)"
        )
    if "check_worst_measured" in s:
        m = s["check_worst_measured"]
        out.append(f"- T=1 check: adaptive/static τ worst {m['ratio']:.3f}× measured (95% CI {m['ci_low']:.2f}–"
                   f"{m['ci_high']:.2f}), {s.get('check_worst_estimated', math.nan):.3f}× estimated")  # fmt: skip
    if report.get("windows"):
        out += [f"- retraining: at most {100 * s['max_train_share']:.1f}% of a window's rollout", "",
                "Speed over windows: adapt.svg.", ""]  # fmt: skip
    out += [*_policy_lines(report), f"Command: `{report['command']}`", ""]
    return "\n".join(out)


def speed_svg(report: dict[str, Any], width: int = 640, panel_h: int = 170) -> str:
    """Tokens/s over windows per configuration for every cell, one panel per cell, dependency-free SVG."""
    cells = _cells(report)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{panel_h * len(cells)}" '
             'font-family="sans-serif" font-size="11">']  # fmt: skip
    for i, name in enumerate(cells):
        parts += _panel(report, name, 0, i * panel_h, width, panel_h)
    return "\n".join(parts + ["</svg>"])


def _panel(report: dict[str, Any], name: str, x0: int, y0: int, w: int, h: int) -> list[str]:
    wins = report["windows"]
    series = {c: [win["cells"][name][c]["tokens_per_s"] for win in wins] for c in CONFIGS}
    top = max(v for vs in series.values() for v in vs if math.isfinite(v)) * 1.1
    left, right, pad = x0 + 50, x0 + w - 90, 22

    def xy(i: int, v: float) -> str:
        x = left + (right - left) * (i / max(1, len(wins) - 1))
        return f"{x:.1f},{y0 + h - pad - (h - 2 * pad) * v / top:.1f}"

    out = [f'<text x="{left}" y="{y0 + 14}">{name}: tokens/s per window (w0 = before adaptation)</text>',
           f'<line x1="{left}" y1="{y0 + h - pad}" x2="{right}" y2="{y0 + h - pad}" stroke="#444"/>']  # fmt: skip
    for j, (c, vs) in enumerate(series.items()):
        pts = " ".join(xy(i, v) for i, v in enumerate(vs))
        out.append(f'<polyline fill="none" stroke="{_COLORS[c]}" stroke-width="2" points="{pts}"/>')
        out.append(f'<text x="{right + 6}" y="{y0 + 30 + 14 * j}" fill="{_COLORS[c]}">{c}</text>')
    for i in range(len(wins)):
        out.append(f'<text x="{xy(i, 0).split(",")[0]}" y="{y0 + h - 6}" text-anchor="middle">w{i}</text>')
    return out
