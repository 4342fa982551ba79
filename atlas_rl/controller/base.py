"""The Controller protocol: per row and step, which speculator drafts and how many tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from atlas_rl.types import Draft, ProposeRecord, SpecStats, StepRecord

if TYPE_CHECKING:
    from atlas_rl.controller.cost import VerificationCost


@dataclass
class PlanState:
    """What the engine tells the controller before a decode step (lists are per active row)."""

    row_ids: list[int]
    group_ids: list[int]
    remaining: list[int]  # completion tokens a row may still emit (>= 1)
    speculators: list[str]  # names of the engine's speculators, in order
    step: int
    greedy: bool
    # the call is seeded (``SamplingParams.seed``): its decisions must not depend on wall-clock time
    reproducible: bool = False


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
    ``num_speculative_tokens`` bounds every draft (the engine sizes its KV cache with it).

    Members with a body here are optional: a controller class that subclasses this Protocol explicitly inherits
    those defaults; the engine calls every member directly. Before a call with speculators, the engine hands the
    controller its cost model when ``needs_cost_model`` (``set_cost_model``), the speculators' stated priors
    (``set_speculator_priors``, ``set_draft_cost_priors``) and, where ``wants_draft_timings`` names them, timings of
    the costly speculators' drafting (``set_draft_timings``; looked up by name, so a controller written before these
    two members existed keeps working).
    """

    num_speculative_tokens: int

    def plan(self, state: PlanState) -> Plan: ...

    def update(self, record: StepRecord, per_row: list[RowOutcome]) -> None:
        """After a step: the step record (timings, per-speculator propose calls) and each row's outcome."""
        ...

    def choose(self, state: PlanState, candidates: list[dict[str, Draft]]) -> list[Draft | None]:
        """One draft per row among its candidates (default: the first candidate of each row)."""
        return [next(iter(c.values()), None) for c in candidates]

    def finish(self, stats: SpecStats) -> None:
        """The call ended with ``stats`` (default: nothing to do)."""
        return None

    @property
    def needs_cost_model(self) -> bool:
        """True when the engine should hand over its verification cost model (default: False)."""
        return False

    def set_cost_model(self, cost: VerificationCost) -> None:
        """The engine's verification cost model (default: ignored)."""
        return None

    def set_speculator_priors(self, priors: dict[str, float]) -> None:
        """Per-token acceptance each named speculator expects before any evidence (default: ignored)."""
        return None

    def set_draft_cost_priors(self, relative: dict[str, float]) -> None:
        """Each named speculator's cost to draft one token, as a share of a one-token target forward over the same
        rows, before it was ever timed (default: ignored)."""
        return None

    def wants_draft_timings(self, names: list[str]) -> list[str]:
        """Of the named (costly) speculators, those whose drafting the engine should time on synthetic rows and
        hand over (``set_draft_timings``) before this call (default: none)."""
        return []

    def set_draft_timings(self, timings: dict[str, list[ProposeRecord]]) -> None:
        """``propose`` timings of each named speculator on synthetic rows (default: ignored)."""
        return None
