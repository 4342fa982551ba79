"""Fixed-k control: every row drafts k tokens with one speculator (benchmarks and the baseline)."""

from __future__ import annotations

from atlas_rl.controller.base import Plan, PlanState
from atlas_rl.types import Draft, SpecStats, StepRecord


class FixedController:
    """Every row uses ``speculator`` (default: the engine's first) with draft length ``k``; k=0 is plain decoding."""

    def __init__(self, k: int, speculator: str | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        self.k = k
        self.max_k = k
        self.speculator = speculator

    def plan(self, state: PlanState) -> Plan:
        name = self.speculator or (state.speculators[0] if state.speculators else None)
        if name is None or self.k == 0:
            return [[] for _ in state.row_ids]
        if name not in state.speculators:
            raise ValueError(f"FixedController names speculator {name!r}; the engine has {state.speculators}")
        return [[(name, self.k)] for _ in state.row_ids]

    def choose(self, state: PlanState, candidates: list[dict[str, Draft]]) -> list[Draft | None]:
        return [next(iter(c.values()), None) for c in candidates]

    def update(self, record: StepRecord, per_row: list[tuple[Draft | None, int]]) -> None:
        pass

    def finish(self, stats: SpecStats) -> None:
        pass
