"""The policy-drift report: summary figures and the markdown tables."""

from __future__ import annotations

from typing import Any

from ..common import fmt
from .options import CONFIGS


def summary(report: dict) -> dict[str, Any]:
    last = report["versions"][-1]["configs"]
    shares = [r["adaptive_train"]["share_of_rollout"] for r in report["versions"]]
    out: dict[str, Any] = {
        "last_version": report["versions"][-1]["version"],
        "adaptive_tau_last": last["adaptive"]["tau"],
        "max_train_share": max(shares),
        "mean_train_share": sum(shares) / len(shares),
    }
    if "static" in last:
        out["static_tau_last"] = last["static"]["tau"]
        out["adaptive_over_static_tau_last"] = last["adaptive"]["tau"] / last["static"]["tau"]
    return out


def render_policy_drift_markdown(report: dict) -> str:
    o = report["options"]
    lines = [
        f"# atlas-rl bench policy-drift — {report['model']} on {report['device']}",
        "",
        f"{o['num_versions']} policy versions: v0 = the target, then {o['finetune_steps']} fine-tuning steps per "
        f"version (batch {o['finetune_batch']} x {o['finetune_seq_len']} tokens, lr {o['finetune_lr']}) on Python "
        f"-> C sources (C share v/{o['num_versions'] - 1}). Benchmark: {o['bench_prompts']} held-out C snippets, "
        f"T={o['temperature']}, {o['max_new_tokens']} new tokens, k={o['k']}, identical at every version. RL rollout "
        f"per version: {o['rollout_prompts']} fresh C snippets x {o['rollout_generations']} (static+adaptive+suffix, "
        "captured). Adaptive retraining budget: "
        f"{100 * o['adaptive_share']:.0f}% of that rollout; the head serves the next version.",
        "",
        f"Static head: {report['static_head']}.",
        "",
        "τ = mean acceptance length (tokens per target forward of a sequence); tok/s = completion tokens / wall "
        "time of generate().",
        "",
    ]
    lines += _versions_table(report) + _adaptive_table(report) + _conclusion(report)
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def _versions_table(report: dict) -> list[str]:
    lines = []
    names = [n for n in CONFIGS if n in report["versions"][0]["configs"]]
    head = "| version | C share | held-out C loss | " + " | ".join(f"{n} τ / tok/s" for n in names)
    head += " | adaptive train s | RL rollout s | train share |"
    lines += [head, "|" + "---|" * (len(names) + 6)]
    for r in report["versions"]:
        cells = [f"{fmt(r['configs'][n]['tau'])} / {fmt(r['configs'][n]['tokens_per_s'], 1)}" for n in names]
        a = r["adaptive_train"]
        lines.append(
            f"| v{r['version']} | {r['c_share']:.2f} | {fmt(r['heldout_c_loss'])} | "
            + " | ".join(cells)
            + f" | {fmt(a['seconds'], 1)} | {fmt(r['rollout']['seconds'], 1)} | {100 * a['share_of_rollout']:.1f}% |"
        )
    return lines


def _adaptive_table(report: dict) -> list[str]:
    lines = [
        "",
        "| version | adaptive steps | train loss | train top-1 | vocab coverage of the rollout: static / adaptive "
        "(before -> after re-ranking) | draft share in static+adaptive+suffix |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["versions"]:
        a = r["adaptive_train"]
        cov = r.get("adaptive_vocab_coverage", {})
        shares = r["configs"]["static+adaptive+suffix"]["draft_share"]
        lines.append(
            f"| v{r['version']} | {a['steps']} | {fmt(a['loss'])} | {fmt(a['top1'])} | "
            f"{fmt(r.get('static_vocab_coverage'))} / {fmt(cov.get('before'))} -> {fmt(cov.get('after'))} | "
            + ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(shares.items()))
            + " |"
        )
    return lines


def _conclusion(report: dict) -> list[str]:
    s = report.get("summary", {})
    lines = [""]
    if "adaptive_over_static_tau_last" in s:
        lines.append(
            f"At the last version (v{s['last_version']}) the adaptive head's τ is "
            f"{fmt(s['adaptive_over_static_tau_last'])}x the static head's ({fmt(s['adaptive_tau_last'])} vs "
            f"{fmt(s['static_tau_last'])}); target >= 1.3x."
        )
    if s:
        lines.append(
            f"Adaptive retraining took at most {100 * s['max_train_share']:.1f}% (mean "
            f"{100 * s['mean_train_share']:.1f}%) of the version's RL rollout time; target <= 10%."
        )
    return lines
