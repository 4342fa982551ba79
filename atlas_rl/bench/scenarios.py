"""The scenarios of ``atlas-rl bench``: name -> options dataclass, ``--quick`` preset, run and render functions.

``--scenario drift`` is an alias of ``policy-drift`` (the name the docs used before controller drift got its own).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ALIASES", "SCENARIOS", "Scenario", "get_scenario"]


@dataclass(frozen=True)
class Scenario:
    """Where a scenario lives: ``module`` holds the options class, the ``QUICK`` preset, run and render."""

    name: str
    help: str
    module: str
    options: str
    run: str
    render: str
    outputs: str  # report file stem: <outputs>.json and <outputs>.md in --out

    def _get(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.module), attr)

    @property
    def options_class(self) -> type:
        return self._get(self.options)

    @property
    def quick(self) -> dict[str, Any]:
        return dict(self._get("QUICK"))

    @property
    def run_fn(self) -> Callable[..., dict]:
        return self._get(self.run)

    @property
    def render_fn(self) -> Callable[[dict], str]:
        return self._get(self.render)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "default",
            "HF generate vs engine k=0 vs the suffix speculator at fixed k, each speculator alone and the atlas "
            "stack, vLLM when available; plus the verification cost table",
            "atlas_rl.bench.run", "BenchOptions", "run_bench", "render_markdown", "bench",
        ),
        Scenario(
            "grid",
            "the auto controller vs every speculator at its best fixed k at 1/4/16/64 active rows",
            "atlas_rl.bench.grid", "GridOptions", "run_grid", "render_grid_markdown", "grid",
        ),
        Scenario(
            "tail",
            "the long tail of a rollout batch: 1/2/4/8 active rows on held-out prompts, T=0 and T=1, k=0 vs each "
            "speculator at its best fixed k vs the default (auto controller, all default speculators)",
            "atlas_rl.bench.tail", "TailOptions", "run_tail", "render_tail_markdown", "tail",
        ),
        Scenario(
            "policy-drift",
            "the policy fine-tuned Python -> C over versions: static / suffix / adaptive / all three per version, "
            "the adaptive head retrained in between",
            "atlas_rl.bench.policy_drift", "DriftOptions", "run_policy_drift", "render_policy_drift_markdown",
            "policy_drift",
        ),
        Scenario(
            "adapt",
            "workload shift: traffic moves to a format the static head never saw; static / suffix / adaptive / the "
            "default stack per window, the adaptive head retrained in between",
            "atlas_rl.bench.adapt", "AdaptOptions", "run_adapt", "render_adapt_markdown", "adapt",
        ),
        Scenario(
            "controller-drift",
            "two synthetic speculators whose quality drifts in opposite directions over rounds, and whether the "
            "auto controller follows",
            "atlas_rl.bench.controller_drift", "GridOptions", "run_controller_drift",
            "render_controller_drift_markdown", "controller_drift",
        ),
    )
}  # fmt: skip
ALIASES = {"drift": "policy-drift"}


def get_scenario(name: str) -> Scenario:
    return SCENARIOS[ALIASES.get(name, name)]
