"""Fixed-k control: every row drafts k tokens with one speculator (benchmarks and the baseline)."""

from __future__ import annotations

from atlas_rl.controller.base import Plan, PlanState
from atlas_rl.types import SpecStats, StepRecord


class FixedController:
    """Every row uses ``speculator`` (default: the engine's first) with draft length ``k``; k=0 is plain decoding."""

    def __init__(self, k: int, speculator: str | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        self.k = k
        self.speculator = speculator

    def plan(self, state: PlanState) -> Plan:
        name = self.speculator or (state.speculators[0] if state.speculators else None)
        if name is None or self.k == 0:
            return [(None, 0)] * len(state.row_ids)
        if name not in state.speculators:
            raise ValueError(f"FixedController names speculator {name!r}; the engine has {state.speculators}")
        return [(name, self.k)] * len(state.row_ids)

    def update(self, record: StepRecord, per_row: list[tuple[str | None, int, int]]) -> None:
        pass

    def finish(self, stats: SpecStats) -> None:
        pass
