"""The Controller protocol: per row and step, which speculator drafts and how many tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from atlas_rl.types import SpecStats, StepRecord


@dataclass
class PlanState:
    """What the engine tells the controller before a decode step (lists are per active row)."""

    row_ids: list[int]
    group_ids: list[int]
    remaining: list[int]  # completion tokens a row may still emit (>= 1)
    speculators: list[str]  # names of the engine's speculators, in order
    step: int
    greedy: bool


Plan = list[tuple[str | None, int]]  # per row: (speculator name or None, max draft tokens)


class Controller(Protocol):
    def plan(self, state: PlanState) -> Plan: ...

    def update(self, record: StepRecord, per_row: list[tuple[str | None, int, int]]) -> None:
        """After a step: the step record and per row (speculator, draft length, accepted)."""
        ...

    def finish(self, stats: SpecStats) -> None: ...
