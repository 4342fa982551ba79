"""The controller on vLLM: how many tokens to draft per step at each batch size, chosen per rollout.

vLLM drafts the same ``k`` for every running row of a step; its dynamic speculative decoding maps the step's
batch size to ``k`` (``num_speculative_tokens_per_batch_size``, ``k = 0``: no drafting). So the controller's
per-row choice becomes a per-batch-size choice, made before each rollout from

* the **cost** of one decode step at ``rows`` running rows without drafting and with the longest draft ``K``
  (:class:`StepCosts`, measured on the running vLLM engine: drafting included), linear in ``k`` in between;
* the **acceptance** per draft position (:class:`PositionAcceptance`): vLLM's per-position counters of the
  rollouts that drafted, decayed so the newest policy weighs most, with a prior from the heads' estimated
  acceptance length on the newest captured samples (it keeps a choice of ``k = 0`` from being final);

``k`` maximises expected tokens per second, ``(1 + a_1 + ... + a_k) / cost(rows, k)``, and a draft must win by
``min_gain`` over no drafting (the rollout is never made slower on the controller's own estimate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

Schedule = list[tuple[int, int, int]]  # (first batch size, last batch size, k): vLLM's format


@dataclass
class StepCosts:
    """Seconds of one decode step at ``rows`` running rows: ``plain[rows]`` without drafting, ``drafted[rows]``
    with a ``max_k``-token draft per row (drafting and verification included)."""

    max_k: int
    plain: dict[int, float] = field(default_factory=dict)
    drafted: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {self.max_k}")
        if sorted(self.plain) != sorted(self.drafted) or not self.plain:
            raise ValueError("plain and drafted need the same, non-empty set of row counts")
        if any(not (v > 0 and math.isfinite(v)) for v in [*self.plain.values(), *self.drafted.values()]):
            raise ValueError("step costs must be finite seconds > 0")

    def _at(self, table: dict[int, float], rows: int) -> float:
        """Linear in log(rows) between measured row counts; the nearest end beyond them (scaled by rows above
        the largest: a compute-bound step grows with the rows)."""
        xs = sorted(table)
        if rows <= xs[0]:
            return table[xs[0]]
        if rows >= xs[-1]:
            return table[xs[-1]] * max(1.0, rows / xs[-1]) if len(xs) > 1 else table[xs[-1]]
        hi = next(x for x in xs if x >= rows)
        lo = max(x for x in xs if x <= rows)
        if hi == lo:
            return table[lo]
        w = (math.log(rows) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return table[lo] * (1 - w) + table[hi] * w

    def cost(self, rows: int, k: int) -> float:
        """Seconds of a step at ``rows`` rows drafting ``k`` tokens per row (never less than without drafting)."""
        c0, ck = self._at(self.plain, rows), self._at(self.drafted, rows)
        return c0 + max(0.0, ck - c0) * min(k, self.max_k) / self.max_k


@dataclass
class PositionAcceptance:
    """Acceptance rate per draft position ``a_j = P(the first j drafts accepted)``: decayed vLLM counters plus a
    prior (geometric rates of a given acceptance length) of weight ``prior_drafts`` drafts."""

    max_k: int
    prior_tau: float = 1.5
    prior_drafts: float = 64.0
    decay: float = 0.5
    drafts: float = 0.0
    accepted: list[float] = field(default_factory=list)

    def set_prior(self, tau: float) -> None:
        """Acceptance length (1 + accepted per draft) the prior stands for, e.g. a head's estimate."""
        if math.isfinite(tau):
            self.prior_tau = min(max(1.0, float(tau)), 1.0 + self.max_k)

    def observe(self, num_drafts: int, accepted_per_pos: list[int]) -> None:
        """One rollout's counters (older rollouts weigh ``decay`` times less each time)."""
        if num_drafts <= 0:
            return
        self.accepted += [0.0] * (self.max_k - len(self.accepted))
        self.drafts = self.drafts * self.decay + num_drafts
        for j in range(self.max_k):
            new = accepted_per_pos[j] if j < len(accepted_per_pos) else 0
            self.accepted[j] = self.accepted[j] * self.decay + new

    def _prior(self) -> list[float]:
        """Geometric rates ``alpha^j`` whose sum over ``max_k`` positions is ``prior_tau - 1``."""
        target = self.prior_tau - 1.0
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if sum(mid ** (j + 1) for j in range(self.max_k)) < target:
                lo = mid
            else:
                hi = mid
        return [lo ** (j + 1) for j in range(self.max_k)]

    def rates(self) -> list[float]:
        prior = self._prior()
        acc = self.accepted + [0.0] * (self.max_k - len(self.accepted))
        n = self.drafts + self.prior_drafts
        return [(acc[j] + prior[j] * self.prior_drafts) / n for j in range(self.max_k)]


def best_k(costs: StepCosts, rates: list[float], rows: int, min_gain: float = 1.03) -> int:
    """The draft length of most expected tokens per second at ``rows`` rows (0 unless it wins by ``min_gain``)."""
    base = 1.0 / costs.cost(rows, 0)
    best, best_speed = 0, base * min_gain
    for k in range(1, costs.max_k + 1):
        speed = (1.0 + sum(rates[:k])) / costs.cost(rows, k)
        if speed > best_speed:
            best, best_speed = k, speed
    return best


def plan_schedule(costs: StepCosts, rates: list[float], max_num_seqs: int, min_gain: float = 1.03) -> Schedule:
    """``best_k`` at every batch size 1..``max_num_seqs``, as vLLM's list of ranges."""
    out: Schedule = []
    for rows in range(1, max_num_seqs + 1):
        k = best_k(costs, rates, rows, min_gain)
        if out and out[-1][2] == k:
            out[-1] = (out[-1][0], rows, k)
        else:
            out.append((rows, rows, k))
    return out
