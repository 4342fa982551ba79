"""Fixed-k control: every row drafts k tokens with one speculator (benchmarks and the baseline)."""

from __future__ import annotations

from atlas_rl.controller.base import Controller, Plan, PlanState, RowOutcome
from atlas_rl.types import Draft, StepRecord


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    return k


class FixedController(Controller):
    """Every row uses ``speculator`` (default: the engine's first) with draft length ``k``; k=0 is plain decoding."""

    def __init__(self, k: int, speculator: str | None = None) -> None:
        self.k = _check_k(k)
        self.num_speculative_tokens = k
        self.speculator = speculator

    @property
    def max_k(self) -> int:
        """Deprecated name of :attr:`num_speculative_tokens`."""
        return self.num_speculative_tokens

    def plan(self, state: PlanState) -> Plan:
        name = self.speculator or (state.speculators[0] if state.speculators else None)
        if name is None or self.k == 0:
            return [[] for _ in state.row_ids]
        if name not in state.speculators:
            raise ValueError(f"FixedController names speculator {name!r}; the engine has {state.speculators}")
        return [[(name, self.k)] for _ in state.row_ids]

    def update(self, record: StepRecord, per_row: list[RowOutcome]) -> None:
        pass


class BestOfController(Controller):
    """Fixed-k multi-speculator mode: every speculator proposes ``k`` tokens for every row and the draft with the
    largest expected accepted length under its own confidences (sum over j of prod_{i<=j} confidence_i) is
    verified. No cost model: the baseline the adaptive controller has to beat."""

    def __init__(self, k: int, speculators: list[str] | None = None) -> None:
        self.k = _check_k(k)
        self.num_speculative_tokens = k
        self.speculators = speculators

    @property
    def max_k(self) -> int:
        """Deprecated name of :attr:`num_speculative_tokens`."""
        return self.num_speculative_tokens

    def plan(self, state: PlanState) -> Plan:
        names = self.speculators or state.speculators
        unknown = [n for n in names if n not in state.speculators]
        if unknown:
            raise ValueError(f"BestOfController names speculators {unknown}; the engine has {state.speculators}")
        if self.k == 0:
            return [[] for _ in state.row_ids]
        return [[(n, self.k) for n in names] for _ in state.row_ids]

    def choose(self, state: PlanState, candidates: list[dict[str, Draft]]) -> list[Draft | None]:
        out: list[Draft | None] = []
        for cands in candidates:
            best, best_score = None, -1.0
            for d in cands.values():
                score, run = 0.0, 1.0
                for c in d.confidence:
                    run *= c
                    score += run
                if score > best_score:
                    best, best_score = d, score
            out.append(best)
        return out

    def update(self, record: StepRecord, per_row: list[RowOutcome]) -> None:
        pass
