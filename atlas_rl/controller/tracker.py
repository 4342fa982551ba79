"""Outcomes of draft tokens, verified or not, read off the tokens the rows go on to emit.

For a one-hot draft (``draft_probs is None``; any draft under greedy decoding) token ``j`` is accepted exactly
when the token the row emits at that place equals it, given that tokens ``< j`` matched: under greedy
verification the emitted token is the target's argmax; under speculative sampling a one-hot draft token ``x``
is accepted with probability ``target_probs(x)`` and, if rejected, the recovered token is drawn from a residual
that excludes ``x``, while without a draft the emitted token is ``x`` with probability ``target_probs(x)`` too.
So comparing *any* one-hot draft with the emitted tokens, over as many steps as it takes, gives unbiased
acceptance outcomes for every speculator that proposed, not only for the draft that was verified: the controller
learns the quality of all speculators it asks at the cost of asking, and needs no verification to explore.
Soft drafts (``draft_probs`` given, sampling) are accepted with ``min(1, target/draft)``, which the emitted
tokens do not reveal: only the verified one counts, through its accepted count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PendingDraft:
    """A draft whose tokens are compared, as they come, with what its row emits."""

    speculator: str
    greedy: bool
    token_ids: list[int]  # the draft (only the first ``length`` tokens count)
    length: int
    bins: np.ndarray  # [length] confidence bin per token
    predicted: np.ndarray  # [length] calibrated acceptance per token at proposal time
    pos: int = 0  # next draft position to resolve


@dataclass
class Outcomes:
    """Resolved draft tokens of one speculator in one mode, column-wise."""

    positions: list[int] = field(default_factory=list)
    bins: list[int] = field(default_factory=list)
    predicted: list[float] = field(default_factory=list)
    accepted: list[bool] = field(default_factory=list)

    def add(self, pos: int, b: int, pred: float, ok: bool) -> None:
        self.positions.append(pos)
        self.bins.append(b)
        self.predicted.append(pred)
        self.accepted.append(ok)


class DraftTracker:
    """Per row, the one-hot drafts not yet resolved; ``emit`` resolves them against the emitted tokens."""

    def __init__(self) -> None:
        self._pending: dict[int, list[PendingDraft]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._pending.values())

    def has_pending(self) -> bool:
        """Whether any row has a draft not yet resolved (O(1): a step without one skips the per-row work)."""
        return bool(self._pending)

    def add(self, row_id: int, draft: PendingDraft) -> None:
        if draft.length > 0:
            self._pending.setdefault(row_id, []).append(draft)

    def emit(self, row_id: int, emitted: list[int], out: dict[tuple[str, bool], Outcomes]) -> None:
        """Row ``row_id`` emitted ``emitted`` (in order): add the outcomes this reveals to ``out``."""
        drafts = self._pending.get(row_id)
        if not drafts or not emitted:
            return
        keep = []
        for d in drafts:
            done = False
            key = (d.speculator, d.greedy)
            o = out.get(key)
            if o is None:
                o = out[key] = Outcomes()
            for tok in emitted:
                j = d.pos
                ok = d.token_ids[j] == tok
                o.add(j, int(d.bins[j]), float(d.predicted[j]), ok)
                d.pos += 1
                if not ok or d.pos >= d.length:
                    done = True
                    break
            if not done:
                keep.append(d)
        if keep:
            self._pending[row_id] = keep
        else:
            del self._pending[row_id]

    def retain(self, row_ids: set[int]) -> None:
        """Forget the drafts of rows not in ``row_ids`` (finished rows: their remaining tokens are censored)."""
        for r in [r for r in self._pending if r not in row_ids]:
            del self._pending[r]

    def clear(self) -> None:
        self._pending.clear()
