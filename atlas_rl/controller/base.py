"""The Controller protocol: per row and step, which speculator drafts and how many tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

from atlas_rl.types import Draft, SpecStats, StepRecord


@dataclass
class PlanState:
    """What the engine tells the controller before a decode step (lists are per active row)."""

    row_ids: list[int]
    group_ids: list[int]
    remaining: list[int]  # completion tokens a row may still emit (>= 1)
    speculators: list[str]  # names of the engine's speculators, in order
    step: int
    greedy: bool


# per row: the candidate (speculator name, max draft tokens) pairs to propose; [] = no speculation for that row
Plan = list[list[tuple[str, int]]]


class RowOutcome(NamedTuple):
    """What verification made of one row's step (rows in the order of the step's ``PlanState``)."""

    draft: Draft | None  # the verified draft (None: the row verified no draft)
    accepted: int  # draft tokens accepted: token j of the draft was accepted iff j < accepted
    output_ids: list[int]  # the accepted draft tokens, then the recovered or bonus token (accepted + 1 ids)


class Controller(Protocol):
    """Decides, per row and step, which speculator drafts and how far (or no speculation at all).

    A decode step calls ``plan`` (which speculators should propose, up to how many tokens, per row), lets
    each named speculator propose, then ``choose`` (one draft per row among the candidates, possibly cut
    short, or None), verifies, and reports back through ``update``. ``finish`` sees the call's stats.
    ``max_k`` bounds every draft (the engine sizes its KV cache with it).
    """

    max_k: int

    def plan(self, state: PlanState) -> Plan: ...

    def choose(self, state: PlanState, candidates: list[dict[str, Draft]]) -> list[Draft | None]: ...

    def update(self, record: StepRecord, per_row: list[RowOutcome]) -> None:
        """After a step: the step record (timings, per-speculator propose calls) and each row's outcome."""
        ...

    def finish(self, stats: SpecStats) -> None: ...
