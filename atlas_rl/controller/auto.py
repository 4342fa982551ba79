"""The confidence-aware controller: per step and row, which speculator drafts, how far, or no speculation at all.

Every decode step maximises *expected emitted tokens per second of wall time*:

* **plan** (before drafting) decides which speculators to ask and for how many tokens. A speculator whose
  predicted drafting cost is negligible (``cheap_fraction`` of a step) is asked for ``max_k`` tokens: asking is how
  the controller keeps learning its quality — every step while free drafts of it could pay, else every
  ``probe_every``-th step (its drafting, and the choice over its drafts, are no longer free at that rate: a few
  percent of a plain step at 8 sampled rows on a CPU). A costly one (a draft head) is asked for the length ``L``
  that maximises the expected rate *including its drafting cost*, or not at all when no length beats plain
  decoding (and then not planned again for ``probe_every`` steps at that batch size); of several that would pay,
  only the best-rated one drafts (one draft per row is verified). The expected rate is
  estimated from a reservoir of the speculator's recent drafts (their confidence bins per position) re-scored with
  the current calibration (optimistic while its evidence is thin, or at one row; for a costly speculator with an
  informed prior or enough evidence its mean from two rows on), summed over random batches of the current size:
  at small batches it credits the selection ``choose`` will make; from 16 rows it is ``rows x`` the calibrated
  *mean* (no selection to credit, a near-certain expectation) and must beat plain decoding by ``margin``, as
  ``choose`` demands. Nothing is asked when even perfect drafts could not pay (large batches on a compute-bound
  device).
* **choose** (after drafting) turns each draft's confidences into calibrated per-token acceptance
  (:class:`.calibration.AcceptanceModel`; a cautious lower bound for drafts that are evaluated whether verified
  or not; for soft drafts under sampling, which only verification can evaluate, an optimistic one while the
  evidence is thin, then the mean), and picks the longest draft ``q`` of the batch that maximises
  ``effective(q) / (forward(rows, q + 1) + overhead(rows, q + 1))`` (the drafting time is already spent), where
  ``effective`` credits the rows' expected tokens ``E_row(q)`` with what they save of the batch's wall time (the
  slowest row sets the number of steps; see :mod:`.planning`); every row takes its best speculator's draft cut
  to ``q`` (and cut earlier where the chance that all its tokens so far are accepted falls below
  ``tail_min_prob``). ``q = 0`` — no speculation for anyone — unless speculation beats plain decoding by
  ``margin``. This is where "never slower" is enforced.
* **update** refines the calibration from the outcomes of *every* one-hot draft proposed (verified or not, read
  off the tokens the rows emit) and of the verified soft drafts at once; the step's timings refine the
  verification cost table (forward time) and each speculator's drafting cost (propose time) when the call ends
  (``finish``), so no decision within a call depends on wall-clock time (reproducible with a seed).

Quiet steps: a step at which every speculator's last refusal at the batch size still stands plans nothing and
prices nothing; a plain step's timings wait for ``probe_every`` of them (one refinement worth as many observations)
and its acceptance decay until the calibration is next read. A near miss stands for one step where a full plan is
cheap against a step (CPUs), up to ``probe_every`` where it is not (a graphed GPU step; :meth:`_near_miss_stand`).
Where nothing pays, the controller then costs next to nothing a step (on an H200 the default engine read 0.77-0.81x
k=0 with planning at every step and 0.85-0.90x with quiet steps at 16 random-weight rows; the rest is the
speculators' own upkeep; ``docs/results/gpu_costs.md``).

Cold start: a speculator never observed is assumed to accept ``prior_mean`` of its tokens (0.5) with a wide
posterior, unless it states its own ``expected_acceptance`` (a draft head's held-out figure, worth
``informed_prior_strength`` observations); it is asked (cheap, or optimistic value) and verified where such an
acceptance pays — except the greedy drafts of a costly speculator on the generic prior, which are evaluated by the
emitted tokens until its evidence outweighs that prior — so a good speculator is found within a few steps and a
useless one is switched off as soon as its first outcomes arrive (at batch 64, after one step). Evidence decays
with a half-life of ``half_life_steps`` steps, so a switched-off speculator is eventually re-examined and a
drifting one is followed; re-examining a costly speculator whose drafts went unused, or whose verified drafts
realised a net loss against plain decoding of the same tokens (the safety net under every prediction: "never
slower" by measurement), is rate-limited to ``exploration_budget`` of the recent wall time, per *regime*
(speculator, greedy or sampled, batch size rounded down to a power of two): drafts wasted at 16 sampled rows, where
verification is compute-bound, say nothing about one greedy row, so they do not silence it there.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from atlas_rl.controller.base import Controller, Plan, PlanState, RowOutcome
from atlas_rl.controller.calibration import AcceptanceModel, confidence_bins
from atlas_rl.controller.cost import VerificationCost
from atlas_rl.controller.draft_cost import DraftCost
from atlas_rl.controller.planning import best_length, effective_tokens, expected_tokens, step_cost_split
from atlas_rl.controller.tracker import DraftTracker, Outcomes, PendingDraft
from atlas_rl.types import CALIBRATION_BINS, Draft, ProposeRecord, SpecStats, SpeculatorStats, StepRecord

logger = logging.getLogger(__name__)


# batches from which planning prices asking a speculator at n x the mean of its recent drafts (no random batches),
# greedy / sampled: at T > 0 the static head's soft drafts verified at 8 rows realised tau 1.04-1.10 where the
# optimistic bound asked for them (the tail, 0.88-0.93x k=0; docs/results/tail.md)
_LARGE_BATCH = {True: 16, False: 8}
# bounds of the factor that brings a drafting probe's timings to its cost table's moment (a factor outside them
# means the table or the probe measured something else, e.g. a table from another machine: trusted only so far)
REFERENCE_SCALE = (1 / 3, 3.0)


# a costly speculator whose best planned rate is under this share of plain decoding's is declined for probe_every
# steps; a nearer miss is planned again at the next step (at one greedy row the static head's value sits near the
# break-even on some hosts' cost tables, and a 4-step refusal there cost up to 15% of its acceptance length)
CLEAR_DECLINE = 0.9


def _row_bucket(n: int) -> int:
    """The batch size rounded down to a power of two (the regime of the waste rate limit)."""
    return 1 << (max(1, n).bit_length() - 1)


@dataclass
class AutoControllerConfig:
    """Settings of :class:`AutoController` (defaults need no tuning; the product turns no knobs).

    Decisions: ``num_speculative_tokens`` (``max_k`` is its deprecated name), ``margin``, ``tail_min_prob``,
    ``cheap_fraction``, ``probe_every``.
    Calibration: ``prior_mean``, ``prior_strength``, ``half_life_steps``, ``exploration_beta``.
    Planning estimate: ``reservoir_size``, ``plan_batches``, ``seed``. Cost table: ``calibration_budget_s``.
    """

    num_speculative_tokens: int = field(
        default=8, metadata={"help": "Longest draft the controller may choose (1..64)."}
    )
    margin: float = field(
        default=0.02,
        metadata={
            "help": "Speculate only when the predicted tokens/s beat plain decoding by this fraction (>= 0): a "
            "safety margin against estimation error."
        },
    )
    tail_min_prob: float = field(
        default=0.01,
        metadata={"help": "Cut a draft where the probability that all its tokens so far are accepted drops below."},
    )
    cheap_fraction: float = field(
        default=0.01,
        metadata={
            "help": "A speculator whose predicted drafting cost is below this fraction of a plain step is always "
            "asked for max_k tokens (keeps its calibration fresh at no real cost)."
        },
    )
    probe_every: int = field(
        default=4,
        metadata={
            "help": "Steps between two looks at a speculator that planning declined (>= 1; 1: every step): a "
            "cheap speculator whose drafts could not pay even if free and optimistic is asked every this many "
            "steps (enough to keep its calibration fresh), and a declined costly one is planned again after as "
            "many steps at the same batch size (without new evidence its value barely moves in between)."
        },
    )
    prior_mean: float = field(
        default=0.5, metadata={"help": "Per-token acceptance assumed for a speculator with no evidence, in (0, 1)."}
    )
    prior_strength: float = field(
        default=2.0, metadata={"help": "Pseudo-observations behind each prior of the calibration (> 0)."}
    )
    informed_prior_strength: float = field(
        default=16.0,
        metadata={
            "help": "Pseudo-observations behind a speculator's own expected acceptance (e.g. from a draft head's "
            "card; > 0): a measured prior needs less exploration than the generic prior_mean."
        },
    )
    half_life_steps: float = field(
        default=50.0,
        metadata={
            "help": "Decode steps after which acceptance evidence weighs half (> 0); lower follows drift faster."
        },
    )
    exploration_beta: float = field(
        default=1.0,
        metadata={"help": "Posterior standard deviations of optimism when deciding which speculators to ask (>= 0)."},
    )
    caution_beta: float = field(
        default=0.5,
        metadata={
            "help": "Posterior standard deviations of pessimism when deciding what to verify (>= 0): thin evidence "
            "must not make a step slower (learning needs no verification: every asked draft is evaluated)."
        },
    )
    soft_explore_tokens: float = field(
        default=16.0,
        metadata={
            "help": "Soft drafts under sampling are judged optimistically (explored by verifying them) until this "
            "many of the speculator's draft tokens were observed (decayed count, >= 0); then by the calibrated mean."
        },
    )
    exploration_budget: float = field(
        default=0.02,
        metadata={
            "help": "Share of recent wall time that a costly speculator's unused drafts may take (in [0, 1)): "
            "re-examining a speculator whose drafts did not pay is rate-limited to this."
        },
    )
    reservoir_size: int = field(
        default=256, metadata={"help": "Recent drafts per speculator kept to estimate what asking it is worth."}
    )
    plan_batches: int = field(
        default=32, metadata={"help": "Random batches drawn from the reservoir per planning estimate (>= 1)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the planner's random batches (reproducible plans)."})
    learn_timings: bool = field(
        default=True,
        metadata={
            "help": "Refine the verification and drafting cost models from measured step timings. Seeded calls "
            "apply a call's timings when it ends (no decision within a call depends on wall-clock time); False "
            "never applies them, so a seeded sequence of calls reproduces exactly run after run (at some speed)."
        },
    )
    calibration_budget_s: float = field(
        default=5.0,
        metadata={"help": "Wall-time bound of the verification cost calibration at engine start (> 0 s)."},
    )
    max_k: int | None = field(
        default=None,
        metadata={"help": "Deprecated name of num_speculative_tokens (kept for one release); None: not given."},
    )

    def __post_init__(self) -> None:
        if self.max_k is not None:
            warnings.warn(
                "AutoControllerConfig(max_k=...) is deprecated: use num_speculative_tokens=...",
                DeprecationWarning,
                stacklevel=3,
            )
            self.num_speculative_tokens = self.max_k
            self.max_k = None
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not (1 <= k <= 64):
            raise ValueError(
                f"num_speculative_tokens (formerly max_k) must be an int in [1, 64], got {k!r}; "
                "use FixedController(0) for k=0"
            )
        for name, lo, hi, lo_open, hi_open in _RANGES:
            _check_range(name, getattr(self, name), lo, hi, lo_open, hi_open)
        if self.reservoir_size < 1 or self.plan_batches < 1:
            raise ValueError("reservoir_size and plan_batches must be >= 1")
        p = self.probe_every
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"probe_every must be an int >= 1 (1: plan every speculator at every step), got {p!r}")


# (field, lower, upper, lower excluded, upper excluded) of AutoControllerConfig's float settings
_RANGES: tuple[tuple[str, float, float, bool, bool], ...] = (
    ("margin", 0.0, math.inf, False, True),
    ("tail_min_prob", 0.0, 1.0, False, True),
    ("exploration_budget", 0.0, 1.0, False, True),
    ("cheap_fraction", 0.0, 1.0, False, True),
    ("prior_mean", 0.0, 1.0, True, True),
    ("prior_strength", 0.0, math.inf, True, True),
    ("informed_prior_strength", 0.0, math.inf, True, True),
    ("half_life_steps", 0.0, math.inf, True, True),
    ("exploration_beta", 0.0, math.inf, False, True),
    ("caution_beta", 0.0, math.inf, False, True),
    ("soft_explore_tokens", 0.0, math.inf, False, True),
    ("calibration_budget_s", 0.0, math.inf, True, True),
)


def _check_range(name: str, v: float, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:  # NaN fails both comparisons
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {v!r}")


class _Reservoir:
    """The most recent drafts of one speculator in one mode, as confidence bins per position (-1: no token)."""

    def __init__(self, size: int, max_k: int) -> None:
        self.bins = np.full((size, max_k), -1, dtype=np.int64)  # [size, max_k]
        self.asked = np.zeros(size, dtype=np.int64)  # [size] tokens asked for
        self.ptr = 0
        self.count = 0

    def add(self, bins: np.ndarray, asked: np.ndarray) -> None:  # bins: [m, max_k], asked: [m]
        size = len(self.asked)
        bins, asked = bins[-size:], asked[-size:]
        idx = (self.ptr + np.arange(len(asked))) % size
        self.bins[idx] = bins
        self.asked[idx] = asked
        self.ptr = int((self.ptr + len(asked)) % size)
        self.count = min(size, self.count + len(asked))


class AutoController(Controller):
    """Picks per step and row the speculator and draft length that maximise expected tokens per second.

    Args:
        config: :class:`AutoControllerConfig`.
        cost: the verification cost model; ``RolloutEngine`` provides its calibrated one when None.
        draft_cost: drafting cost per speculator (learned online; a fresh one when None).
        clock: the clock the controller times its own ``update`` with (part of a step's overhead); a simulation
            whose steps carry synthetic timings passes a constant one, so its decisions do not follow the host's load.
    """

    def __init__(
        self,
        config: AutoControllerConfig | None = None,
        cost: VerificationCost | None = None,
        draft_cost: DraftCost | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.config = config or AutoControllerConfig()
        self.clock = clock
        c = self.config
        self.num_speculative_tokens = c.num_speculative_tokens
        self.cost = cost
        self.draft_cost = draft_cost or DraftCost()
        self.acceptance = AcceptanceModel(
            c.num_speculative_tokens,
            prior_mean=c.prior_mean,
            prior_strength=c.prior_strength,
            half_life_steps=c.half_life_steps,
            beta=c.exploration_beta,
            beta_low=c.caution_beta,
        )
        self._tracker = DraftTracker()
        self._reservoirs: dict[tuple[str, bool], _Reservoir] = {}
        self._rng = np.random.default_rng(c.seed)
        # per-step state between plan/choose and update
        self._asked: dict[str, int] = {}
        self._cheap: set[str] = set()  # speculators asked this step because drafting is (predicted) negligible
        self._step_rows: list[int] = []
        self._plans = 0  # plan() calls so far (the cheap speculators' probing schedule)
        # (speculator, greedy, rows) -> the first plan() at which its last refusal no longer stands
        self._declined: dict[tuple[str, bool, int], int] = {}
        self._declined_cheap: set[str] = set()  # speculators that were cheap when last declined (probed anyway)
        self._pending_decays = 0  # steps whose acceptance decay waits (applied before the calibration is read)
        self._plan_cost_s = 0.0  # seconds of a full plan() as measured up to the last call's end (0: never timed)
        self._call_plan = [0.0, 0]  # this call's full plans: (seconds, count)
        self._soft: dict[int, tuple[str, list[int], list[float]]] = {}
        self._greedy = False
        self._reproducible = False  # this call's timings wait for finish()
        self._last_update_s = 0.0
        self._recent_s = 0.0  # decayed wall time of recent steps
        # decayed drafting time whose drafts went unused, per regime (speculator, greedy, row bucket)
        self._wasted_s: dict[tuple[str, bool, int], float] = {}
        # a seeded call's own waste account and recent time, priced by the cost models as they stood at its start
        # (its measured timings wait for finish()): the exploration budget binds within the call, deterministically
        self._call_wasted_s: dict[tuple[str, bool, int], float] = {}
        self._call_recent_s = 0.0
        self._plan_step_s: tuple[int, np.ndarray] = (0, np.zeros(0))  # (rows, [K+1] seconds) priced by plan()
        self._draft_cost_prior: dict[str, float] = {}  # speculator -> share of a one-token forward per draft token
        self._decay = 0.5 ** (1.0 / c.half_life_steps)
        self._call_calibration: dict[str, np.ndarray] = {}  # speculator -> [CALIBRATION_BINS, 3]
        # (step record, speculators whose drafts were verified, seconds of the previous update) of this call's steps
        self._timings: list[tuple[StepRecord, set[str], float]] = []

    # ------------------------------------------------------------------------------------------ wiring
    @property
    def max_k(self) -> int:
        """Deprecated name of :attr:`num_speculative_tokens`."""
        return self.num_speculative_tokens

    @property
    def needs_cost_model(self) -> bool:
        return self.cost is None

    def set_cost_model(self, cost: VerificationCost) -> None:
        self.cost = cost

    def set_speculator_priors(self, priors: dict[str, float]) -> None:
        """Per-token acceptance each named speculator expects before any evidence (``expected_acceptance`` of
        the speculator, e.g. from a draft head's card); the others start from ``prior_mean``."""
        for name, mean in priors.items():
            self.acceptance.set_prior(name, mean, self.config.informed_prior_strength)

    def set_draft_cost_priors(self, relative: dict[str, float]) -> None:
        """Drafting cost of one token per speculator as a share of a one-token target forward (e.g. a head's MACs
        over the target's): what a speculator's drafts are priced at until the engine has timed it (``update``
        applies timings when a seeded call ends, so without this a seeded call would draft as if it were free)."""
        for name, r in relative.items():
            if not (r >= 0 and math.isfinite(r)):
                raise ValueError(f"draft cost prior of {name!r} must be a finite share >= 0, got {r!r}")
        self._draft_cost_prior.update(relative)

    def wants_draft_timings(self, names: list[str]) -> list[str]:
        """The named speculators the drafting-cost model has never timed, while it learns from timings at all: a
        probe on synthetic rows prices them from the first step of a seeded call (their prior, a share of the
        target's MACs, missed the head's drafting by 1.6-1.8x on the AMD host); ``learn_timings=False`` keeps the
        prior, so such calls reproduce whatever the host's speed."""
        seen = getattr(self.draft_cost, "observations", None)
        if not self.config.learn_timings or seen is None:
            return []
        return [name for name in names if seen(name) == 0]

    def set_draft_timings(self, timings: dict[str, list[ProposeRecord]]) -> None:
        """Observations of the drafting-cost model for the speculators it has never timed (the engine's probe);
        refined, then outweighed, by the speculators' real proposals like any other observation."""
        for name in self.wants_draft_timings(list(timings)):
            for rec in timings[name]:
                self.draft_cost.observe(name, self._at_table_speed(rec))

    def _at_table_speed(self, rec: ProposeRecord) -> ProposeRecord:
        """A probe's timing in the units of the verification cost table: scaled by the table's rows x 1 forward
        over the reference forward timed beside the proposals (within ``REFERENCE_SCALE``); as it is without one."""
        if rec.reference_s is None or not rec.reference_s > 0 or self.cost is None:
            return rec
        lo, hi = REFERENCE_SCALE
        scale = min(hi, max(lo, self.cost.forward_s(rec.rows, 1) / rec.reference_s))
        return ProposeRecord(rec.rows, rec.tokens, rec.seconds * scale)

    def _draft_s(self, name: str, n: int, L: int, step_s: np.ndarray) -> float:
        """Predicted seconds for ``name`` to draft ``L`` tokens for ``n`` rows (its prior until first timed)."""
        seen = getattr(self.draft_cost, "observations", None)  # a custom cost model may not count: trust it
        if seen is not None and seen(name) == 0 and name in self._draft_cost_prior:
            return self._draft_cost_prior[name] * L * float(step_s[0])
        return self.draft_cost.predict(name, n, L)

    def _draft_curve(self, name: str, n: int, step_s: np.ndarray) -> np.ndarray:  # step_s: [K+1]
        """``[K]`` predicted seconds for ``name`` to draft L = 1 .. K tokens for ``n`` rows."""
        K = self.num_speculative_tokens
        seen = getattr(self.draft_cost, "observations", None)
        curve = getattr(self.draft_cost, "predict_curve", None)  # a custom cost model may predict one at a time
        if curve is None or seen is None or (seen(name) == 0 and name in self._draft_cost_prior):
            return np.array([self._draft_s(name, n, L, step_s) for L in range(1, K + 1)])
        return curve(name, n, K)

    def _cost(self) -> VerificationCost:
        if self.cost is None:
            raise ValueError(
                "AutoController has no verification cost model: pass cost=... (see atlas_rl.controller.cost), or "
                "use it through RolloutEngine.generate, which supplies the engine's calibrated one"
            )
        return self.cost

    def _step_cost(self, n: int) -> np.ndarray:
        """``[max_k+1]`` seconds of a step of ``n`` rows whose longest draft has q = 0 .. max_k tokens."""
        cost = self._cost()
        return cost.step_curve(n, self.num_speculative_tokens + 1)

    def _split(self, n: int, step_s: np.ndarray) -> tuple[float, float]:
        """``(fixed, per_row)`` seconds of a plain step of ``n`` rows (:func:`.planning.step_cost_split`)."""
        base_1 = float(self._step_cost(1)[0]) if n > 1 else float(step_s[0])
        return step_cost_split(float(step_s[0]), base_1, n)

    # ------------------------------------------------------------------------------------------ plan
    def plan(self, state: PlanState) -> Plan:
        n, K = len(state.row_ids), self.num_speculative_tokens
        if self._tracker.has_pending():
            self._tracker.retain(set(state.row_ids))
        self._greedy = state.greedy
        self._reproducible = state.reproducible
        self._asked = {}
        self._cheap = set()
        self._plans += 1
        if self._refusals_stand(state.speculators, state.greedy, n):
            return [[] for _ in state.remaining]  # a quiet step: nothing new to plan on, O(1) per row
        t0 = self.clock()
        out = self._full_plan(state, n, K)
        self._call_plan[0] += self.clock() - t0
        self._call_plan[1] += 1
        return out

    def _full_plan(self, state: PlanState, n: int, K: int) -> Plan:
        self._flush_quiet()
        step_s = self._step_cost(n)  # [K+1]
        self._plan_step_s = (n, step_s)  # the step's prices, for a seeded call's own account in update()
        base_rate = n / step_s[0]
        # even perfect drafts (every token accepted) cannot pay: do not even ask (again for probe_every steps)
        perfect = n * np.arange(1, K + 2) / step_s
        if perfect[1:].max() <= base_rate:
            until = self._plans + self.config.probe_every
            self._declined.update({(name, state.greedy, n): until for name in state.speculators})
            self._declined_cheap.difference_update(state.speculators)
        else:
            for name in state.speculators:
                L = self._plan_length(name, state.greedy, n, step_s, base_rate)
                if L > 0:
                    self._asked[name] = L
            self._keep_best_costly(n, step_s)
        out: Plan = []
        for rem in state.remaining:
            cap = rem - 1
            out.append([(name, min(L, cap)) for name, L in self._asked.items()] if cap > 0 else [])
        return out

    def _refusals_stand(self, names: list[str], greedy: bool, n: int) -> bool:
        """Whether every speculator's last refusal at this batch size still stands (``probe_every`` steps, and no
        cheap one due for its probe): then the step plans nothing, reads no model, and its bookkeeping waits
        (``update``), so a call where speculation does not pay costs the controller next to nothing a step."""
        if not names:
            return False
        probe = self._plans % self.config.probe_every == 0
        for name in names:
            until = self._declined.get((name, greedy, n))
            if until is None or self._plans >= until or (probe and name in self._declined_cheap):
                return False
        return True

    def _keep_best_costly(self, n: int, step_s: np.ndarray) -> None:  # step_s: [K+1]
        """Of the costly speculators planning would ask, keep only the one of the best mean rate: each draws
        a draft for every row and one per row is verified, so a second head's drafting (a few ms per step on a CPU)
        buys only the rows where its draft beats the first's, which its planned rate never priced. A head whose drafts
        are only evaluated this step (:meth:`_evaluation_only`) is not in the contest. A head left out gets no new
        evidence: its mean decays back toward its prior (on the generic prior, to being evaluated again)."""
        costly = [s for s in self._asked if s not in self._cheap and not self._evaluation_only(s)]
        if len(costly) > 1:
            best = max(costly, key=lambda s: self._mean_rate(s, n, step_s))
            for s in costly:
                if s != best:
                    del self._asked[s]

    def _mean_rate(self, name: str, n: int, step_s: np.ndarray) -> float:  # step_s: [K+1]
        """Rows per second of ``n`` rows asking ``name`` for its planned length, at its calibrated *mean* acceptance
        (what the contest between heads ranks by: a head with little evidence has a wide optimistic bound, and
        ranking by it dropped the established head for a few steps of every fresh call)."""
        L = self._asked[name]
        totals = n * expected_tokens(self.acceptance.estimates(name, self._greedy).marginal[None])[0]  # [K+1]
        return float((totals[: L + 1] / (step_s[: L + 1] + self._draft_s(name, n, L, step_s))).max())

    def _evaluation_only(self, name: str) -> bool:
        """Whether ``name``'s drafts this step are evaluated (from the emitted tokens) but not verified: a costly
        speculator's one-hot greedy drafts while its evidence does not outweigh the generic prior (see
        :meth:`_candidate_arrays`). It takes no verified row from another head, and its drafting is charged as
        unused (the exploration budget bounds it), so it is asked beside the best-rated one."""
        if not self._greedy or self.acceptance.has_prior(name):
            return False
        return self.acceptance.observed_tokens(name, True) < self.config.prior_strength

    def _plan_length(self, name: str, greedy: bool, n: int, step_s: np.ndarray, base_rate: float) -> int:
        """Tokens to ask ``name`` for (0: do not ask)."""
        K = self.num_speculative_tokens
        cheap = self._draft_s(name, n, K, step_s) <= self.config.cheap_fraction * step_s[0]
        if cheap and self._plans % self.config.probe_every == 0:
            self._cheap.add(name)
            return K  # a probing step: asked whatever it is worth
        key = (name, greedy, n)
        if self._plans < self._declined.get(key, 0):
            return 0  # declined a few steps ago at this batch size: nothing new to plan on
        L, clear = (
            self._cheap_length(name, greedy, n, step_s, base_rate)
            if cheap
            else self._costly_length(name, greedy, n, step_s, base_rate)
        )
        if L == 0:
            self._declined[key] = self._plans + (self.config.probe_every if clear else self._near_miss_stand(step_s))
            (self._declined_cheap.add if cheap else self._declined_cheap.discard)(name)
        return L

    def _near_miss_stand(self, step_s: np.ndarray) -> int:  # step_s: [K+1]
        """Steps a near miss stands (1: planned again at the next step): re-planning it is itself exploration, so
        at most ``exploration_budget`` of a plain step may go to it — on this project's CPU (a full plan 0.4 ms, a
        plain step 34-45 ms at 1-4 rows) every step, as measured best there; on a GPU (a full plan ~0.4 ms of a
        3.7 ms graphed SmolLM2 step) every ``probe_every`` steps. The plan's cost is the one measured up to the last
        call's end (a seeded call's decisions depend on the controller's state at its start, never on its clock)."""
        budget = self.config.exploration_budget * float(step_s[0])
        if self._plan_cost_s <= 0.0:
            return 1
        share = self._plan_cost_s / budget if budget > 0.0 else math.inf
        return int(min(self.config.probe_every, max(1, math.ceil(share))))

    def _cheap_length(self, name: str, greedy: bool, n: int, step_s: np.ndarray, base_rate: float) -> tuple[int, bool]:
        """A cheap speculator is asked for ``max_k`` tokens while free drafts of it could pay, else not (0); the
        flag: a refusal may stand for ``probe_every`` steps."""
        if not self._could_pay(name, greedy, n, step_s, base_rate):
            return 0, True
        self._cheap.add(name)
        return self.num_speculative_tokens, False

    def _costly_length(
        self, name: str, greedy: bool, n: int, step_s: np.ndarray, base_rate: float
    ) -> tuple[int, bool]:
        """The length that maximises the expected rate of a costly speculator, drafting included (0: none pays);
        the flag: a refusal is clear (its best rate under ``CLEAR_DECLINE`` of what it must beat) and may stand for
        ``probe_every`` steps. A near miss, or a wait on the exploration budget, is planned again at the next step;
        at a large batch every refusal stands (there a plan is an expectation over many rows that a few steps barely
        move, and re-planning at every step was ~0.1 ms of the controller's ~0.6 ms a step at 16 rows)."""
        K = self.num_speculative_tokens
        large = n >= _LARGE_BATCH[greedy]
        if self._over_budget(name, greedy, n):  # its recent drafts in this regime cost more than the budget: wait
            return 0, large or self._budget_wait_steps(name, greedy, n) >= self.config.probe_every
        draft_s = self._draft_curve(name, n, step_s)  # [K]
        # optimistic on purpose below 16 rows (it decides whether to *ask*): rows assumed alike, so the batch's
        # expected tokens are its effective tokens; choose() decides on the actual drafts, where the slowest row counts
        totals = self._sampled_totals(name, greedy, n, explore=n == 1 or not self._settled(name, greedy))  # [M, K+1]
        # a large batch is a near-certain expectation (no selection to credit, no optimism): asking must beat plain
        # decoding by the margin that choose() demands, or its drafting is spent for nothing
        floor = base_rate * (1.0 + self.config.margin if large else 1.0)
        # rate[L] = mean over batches of the best cut q <= L once L tokens were drafted: [M, q, L] -> [L]
        q = np.arange(K + 1)
        per = totals[:, :, None] / (step_s[:, None] + draft_s[None, :])  # [M, K+1, K]
        per = np.where(q[:, None] <= q[None, 1:], per, -np.inf)
        rates = per.max(1).mean(0)  # [K]
        best = int(rates.argmax())
        return (best + 1, False) if rates[best] > floor else (0, large or rates[best] < CLEAR_DECLINE * floor)

    def _could_pay(self, name: str, greedy: bool, n: int, step_s: np.ndarray, base_rate: float) -> bool:
        """Whether free drafts of ``name`` (``step_s [K+1]``: a step's seconds by draft length) would beat plain
        decoding on the acceptance planning credits it with (optimistic below large batches)."""
        totals = self._sampled_totals(name, greedy, n)  # [M, K+1]
        return float((totals[:, 1:] / step_s[1:]).max(1).mean()) > base_rate

    def _settled(self, name: str, greedy: bool) -> bool:
        """Whether ``name``'s evidence is settled: an informed prior (its own stated acceptance) or
        ``soft_explore_tokens`` observed draft tokens. From two rows on, planning then prices a costly speculator at
        its calibrated mean, not its optimistic bound: asking it costs real drafting time at every step (at 4-7
        sampled rows on two threads 11-20 ms of a ~55 ms step; an optimistic static head was asked there at a ~15%
        loss, the demo). One row keeps the optimism: one row's drafting is the cheapest look, and where speculation
        pays most."""
        return self._evidence(name, greedy) >= self.config.soft_explore_tokens

    def _evidence(self, name: str, greedy: bool) -> float:
        """``name``'s observed draft tokens (decayed), unbounded when it states its own prior (a measured prior is
        evidence)."""
        return math.inf if self.acceptance.has_prior(name) else self.acceptance.observed_tokens(name, greedy)

    def _sampled_totals(self, name: str, greedy: bool, n: int, explore: bool = True) -> np.ndarray:
        """``[M, max_k+1]`` expected tokens of a batch of ``n`` rows asking ``name``, cut to q tokens, over M random
        batches of its recent drafts (at large batches one line: ``n x`` the calibrated mean); per draft token the
        optimistic bound below large batches while ``explore``, else the calibrated mean."""
        est = self.acceptance.estimates(name, greedy)
        large = n >= _LARGE_BATCH[greedy]  # the calibrated mean: optimism explores at small batches (a row is cheap)
        optimistic = explore and not large
        per_bin = est.optimistic if optimistic else est.mean  # [K, B]
        marginal = est.marginal_optimistic if optimistic else est.marginal  # [K]
        res = self._reservoirs.get((name, greedy))
        if res is None or res.count == 0:
            return n * expected_tokens(marginal[None])
        K = self.num_speculative_tokens
        bins = res.bins[: res.count]  # [R, K]
        j = np.arange(K)[None, :]
        acc = np.where(
            bins >= 0,
            per_bin[j, np.maximum(bins, 0)],
            np.where(j >= res.asked[: res.count, None], marginal[None, :], 0.0),
        )  # [R, K]
        e = expected_tokens(acc)  # [R, K+1]
        if large or res.count < 2:
            return n * e.mean(0, keepdims=True)
        idx = self._rng.integers(0, res.count, size=(self.config.plan_batches, n))
        return e[idx].sum(1)

    # ------------------------------------------------------------------------------------------ choose
    def choose(self, state: PlanState, candidates: list[dict[str, Draft]]) -> list[Draft | None]:
        n, K = len(candidates), self.num_speculative_tokens
        greedy = state.greedy
        self._step_rows = list(state.row_ids)
        self._soft = {}
        names = list(self._asked) or sorted({s for c in candidates for s in c})
        if not names or n == 0:
            return [None] * n
        acc, low, bins, lens = self._candidate_arrays(candidates, names, greedy)
        self._remember(state, candidates, names, bins, acc, lens)
        self._mask_in_debt(low, names, greedy, n)
        E = expected_tokens(low)  # [n, S, K+1]
        best_s = E.argmax(1)  # [n, K+1]
        best_E = E.max(1)  # [n, K+1]
        step_s = self._step_cost(n)
        # the rows that can bound the batch's remaining steps: those furthest from their token budget
        rem = np.asarray(state.remaining)
        behind = rem >= rem.max() - K if n else np.zeros(0, dtype=bool)
        total = effective_tokens(best_E.sum(0), best_E[behind].min(0), n, *self._split(n, step_s))  # [K+1]
        # the drafting time of this step is spent whatever is verified: the choice weighs only what verifying
        # more tokens costs against what it saves (a sunk cost added to both sides would favour speculating)
        q, _ = best_length(total, step_s, self.config.margin)
        out: list[Draft | None] = [None] * n
        if q == 0:
            return out
        si = best_s[:, q]  # [n]
        rows = np.arange(n)
        surv = np.cumprod(low[rows, si, :q], axis=1)  # [n, q] chance that all tokens so far are accepted
        keep = np.minimum((surv >= self.config.tail_min_prob).sum(1), lens[rows, si])  # [n]
        for i in np.nonzero(keep)[0].tolist():
            name, m = names[si[i]], int(keep[i])
            d = candidates[i][name]
            out[i] = d.truncate(m)
            if d.draft_probs is not None and not greedy:
                self._soft[i] = (name, bins[i, si[i], :m].tolist(), acc[i, si[i], :m].tolist())
        return out

    def _mask_in_debt(self, low: np.ndarray, names: list[str], greedy: bool, n: int) -> None:
        """Zero, in place, the decision acceptance ``low [n, S, K]`` of the speculators whose account in this regime
        (unused drafting plus realised losses, :meth:`_charge_realised`) exceeds the exploration budget: their drafts
        are still evaluated (one-hot drafts learn without verification), not verified, until the account decays.
        The cheap speculators, always asked, are held back here; the costly ones are not even asked (``plan``)."""
        for c, s in enumerate(names):
            if self._over_budget(s, greedy, n):
                low[:, c, :] = 0.0

    def _budget_wait_steps(self, name: str, greedy: bool, n: int) -> float:
        """Steps until ``name``'s account in this regime decays under the exploration budget (recent time assumed
        steady): a wait of ``probe_every`` steps or more is a clear refusal, planned again only after it."""
        account, limit = self._account(name, greedy, n)
        if account <= limit:
            return 0.0
        return math.inf if limit <= 0.0 else math.log(limit / account) / math.log(self._decay)

    def _over_budget(self, name: str, greedy: bool, n: int) -> bool:
        """Whether ``name``'s account in the regime of ``n`` rows exceeds the exploration budget of recent time."""
        account, limit = self._account(name, greedy, n)
        return account > limit

    def _account(self, name: str, greedy: bool, n: int) -> tuple[float, float]:
        """(``name``'s account in the regime of ``n`` rows: unused drafting plus realised losses, the exploration
        budget of recent time it is held to), in seconds."""
        key = (name, greedy, _row_bucket(n))
        account = self._wasted_s.get(key, 0.0) + self._call_wasted_s.get(key, 0.0)
        return account, self.config.exploration_budget * (self._recent_s + self._call_recent_s)

    def _candidate_arrays(
        self, candidates: list[dict[str, Draft]], names: list[str], greedy: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every candidate token at once, (row, speculator column, position) -> ``acc`` [n, S, K] calibrated
        acceptance (0 past each draft's end), ``low`` [n, S, K] what decisions use (a cautious or an exploring
        bound), ``bins`` [n, S, K] confidence bins (-1 past the end), ``lens`` [n, S] draft lengths (capped at K)."""
        n, K = len(candidates), self.num_speculative_tokens
        col = {s: i for i, s in enumerate(names)}
        flat = [(i, col[s], d) for i, c in enumerate(candidates) for s, d in c.items() if s in col and len(d) > 0]
        lens = np.zeros((n, len(names)), dtype=np.int64)
        acc = np.zeros((n, len(names), K))
        low = np.zeros((n, len(names), K))
        bins = np.full((n, len(names), K), -1, dtype=np.int64)
        if not flat:
            return acc, low, bins, lens
        m = np.array([min(len(d), K) for _, _, d in flat])
        ri = np.repeat([i for i, _, _ in flat], m)
        ci = np.repeat([c for _, c, _ in flat], m)
        pj = np.arange(int(m.sum())) - np.repeat(np.cumsum(m) - m, m)
        conf = np.fromiter((x for _, _, d in flat for x in d.confidence[:K]), dtype=float, count=int(m.sum()))
        b = confidence_bins(conf)
        est = [self.acceptance.estimates(s, greedy) for s in names]
        mean = np.stack([e.mean for e in est])[ci, pj, b]  # [S, K, B] gathered
        acc[ri, ci, pj] = mean
        # decisions: cautious where every asked draft is evaluated anyway (one-hot drafts, greedy). Soft drafts
        # under sampling are evaluated only by verifying them: optimistic while their evidence is thin
        # (exploration by verifying), the calibrated mean once it is not (evidence decays, so a speculator left
        # unverified becomes thin, and optimistic, again)
        soft = np.repeat([d.draft_probs is not None and not greedy for _, _, d in flat], m)
        # evidence per speculator: its observed draft tokens (decayed), unbounded when it states its own prior (a
        # measured prior is evidence: no optimistic phase, no wait below)
        seen = np.array([self._evidence(s, greedy) for s in names])
        thin = (seen < self.config.soft_explore_tokens)[ci]
        optimistic = np.stack([e.optimistic for e in est])[ci, pj, b]
        pessimistic = np.stack([e.pessimistic for e in est])[ci, pj, b]
        # a one-hot draft of a costly speculator whose evidence does not yet outweigh the generic prior is evaluated
        # (by the tokens the rows emit) but not verified: the prior is no evidence, and one lucky token on it made a
        # collapsed head look good; its drafting counts as unused, so the plan re-asks it once the account allows
        costly = np.array([s not in self._cheap for s in names])
        unseen = (costly & (seen < self.config.prior_strength))[ci]
        low[ri, ci, pj] = np.where(soft, np.where(thin, optimistic, mean), np.where(unseen, 0.0, pessimistic))
        bins[ri, ci, pj] = b
        lens[[i for i, _, _ in flat], [c for _, c, _ in flat]] = m
        return acc, low, bins, lens

    def _remember(
        self,
        state: PlanState,
        candidates: list[dict[str, Draft]],
        names: list[str],
        bins: np.ndarray,  # [n, S, K]
        acc: np.ndarray,  # [n, S, K]
        lens: np.ndarray,  # [n, S]
    ) -> None:
        """Register one-hot candidates with the tracker and every asked row's draft with the reservoirs."""
        greedy = state.greedy
        remaining = np.asarray(state.remaining)
        asked_rows = np.nonzero(remaining > 1)[0]
        for c, s in enumerate(names):
            L = self._asked.get(s)
            if L is None or len(asked_rows) == 0:
                continue
            key = (s, greedy)
            if key not in self._reservoirs:
                self._reservoirs[key] = _Reservoir(self.config.reservoir_size, self.num_speculative_tokens)
            self._reservoirs[key].add(bins[asked_rows, c], np.minimum(L, remaining[asked_rows] - 1))
        for i, c in zip(*np.nonzero(lens)):
            s = names[c]
            d = candidates[i][s]
            if d.draft_probs is None or greedy:
                m = int(lens[i, c])
                self._tracker.add(state.row_ids[i], PendingDraft(s, greedy, d.token_ids, m, bins[i, c], acc[i, c]))

    # ------------------------------------------------------------------------------------------ update
    def update(self, record: StepRecord, per_row: list[RowOutcome]) -> None:
        """Learn from one step. Acceptance evidence (a function of the emitted tokens) is used at once; the step's
        timings too, unless the call is seeded (``PlanState.reproducible``): then they wait for :meth:`finish`, so
        no decision within the call depends on wall-clock time (``docs/decisions/reproducibility.md``)."""
        t0 = self.clock()
        self._cost()
        used = {o.draft.speculator for o in per_row if o.draft is not None}
        self._timings.append((record, used, self._last_update_s))
        plain = not record.proposals and record.query_len <= 1
        if self._reproducible:
            self._account_predicted(record, used)
        elif not plain or len(self._timings) >= self.config.probe_every:
            self._apply_timings()  # a plain step's timings wait for a few more (refined at once: _observe_plain)
        self._pending_decays += 1
        if self._soft or self._tracker.has_pending():
            self._resolve(per_row)
        self._soft = {}
        self._last_update_s = self.clock() - t0

    def _flush_quiet(self) -> None:
        """Apply the acceptance decays that quiet steps left waiting (before the calibration is read again; their
        timings wait for ``probe_every`` plain steps, a drafting step, or the call's end)."""
        self.acceptance.decay(self._greedy, self._pending_decays)
        self._pending_decays = 0

    def _resolve(self, per_row: list[RowOutcome]) -> None:
        """The step's acceptance evidence: pending one-hot drafts resolved by the emitted tokens, and verified soft
        drafts."""
        self.acceptance.decay(self._greedy, self._pending_decays)
        self._pending_decays = 0
        greedy = self._greedy
        outcomes: dict[tuple[str, bool], Outcomes] = {}
        for i, o in enumerate(per_row):
            if i < len(self._step_rows):
                self._tracker.emit(self._step_rows[i], o.output_ids, outcomes)
            soft = self._soft.get(i)
            if soft is not None and o.draft is not None:
                name, bins, pred = soft
                out = outcomes.setdefault((name, greedy), Outcomes())
                for j in range(min(len(o.draft), len(bins), o.accepted + 1)):
                    out.add(j, bins[j], pred[j], j < o.accepted)
        self._observe(outcomes)

    def _observe(self, outcomes: dict[tuple[str, bool], Outcomes]) -> None:
        for (name, greedy), obs in outcomes.items():
            if not obs.positions:
                continue
            pos = np.array(obs.positions, dtype=np.int64)
            bins = np.array(obs.bins, dtype=np.int64)
            ok = np.array(obs.accepted, dtype=float)
            pred = np.array(obs.predicted, dtype=float)
            self.acceptance.observe(name, greedy, pos, bins, ok, pred)
            cal = self._call_calibration.setdefault(name, np.zeros((CALIBRATION_BINS, 3)))
            pb = np.minimum(np.maximum((pred * CALIBRATION_BINS).astype(np.int64), 0), CALIBRATION_BINS - 1)
            np.add.at(cal, pb, np.stack([np.ones_like(pred), pred, ok], 1))

    def _apply_timings(self) -> None:
        """Refine the verification and drafting cost models from the steps timed since the last time."""
        cost = self._cost()
        timings, self._timings = self._timings, []
        if not self.config.learn_timings:
            return
        plain: list[tuple[int, float, float]] = []  # consecutive plain steps: (rows, forward s, overhead s)
        for record, used, update_s in timings:
            propose_s = sum(p.seconds for p in record.proposals.values())
            overhead = record.step_s - record.forward_s - propose_s + update_s
            if not record.proposals and record.query_len <= 1:
                plain.append((record.num_rows, record.forward_s, overhead))
            else:
                self._observe_plain(plain)
                cost.observe(record.num_rows, record.query_len, record.forward_s, overhead)
            self._recent_s = self._decay * self._recent_s + record.step_s
            for key in list(self._wasted_s):
                self._wasted_s[key] *= self._decay
            unused_s = 0.0
            for name, p in record.proposals.items():
                self.draft_cost.observe(name, p)
                if name not in used:
                    key = (name, self._greedy, _row_bucket(record.num_rows))
                    self._wasted_s[key] = self._wasted_s.get(key, 0.0) + p.seconds
                    unused_s += p.seconds
            self._charge_realised(record, used, update_s, unused_s)
        self._observe_plain(plain)

    def _observe_plain(self, plain: list[tuple[int, float, float]]) -> None:
        """Refine the cost table from plain steps (``(rows, forward s, overhead s)`` each, emptied): one update per
        batch size, at their typical timings (geometric mean forward, mean overhead), worth as many observations
        (:meth:`VerificationCost.observe`'s ``count``) — per step it was ~0.15 ms of numpy on a CPU, a twentieth of
        a 3.7 ms graphed GPU step where nothing else of the controller runs."""
        by_rows: dict[int, list[tuple[float, float]]] = {}
        for rows, fwd, over in plain:
            if fwd > 0 and math.isfinite(fwd):
                by_rows.setdefault(rows, []).append((fwd, over))
        plain.clear()
        for rows, obs in by_rows.items():
            a = np.asarray(obs)  # [m, 2]
            self._cost().observe(rows, 1, float(np.exp(np.log(a[:, 0]).mean())), float(a[:, 1].mean()), len(obs))

    def _account_predicted(self, record: StepRecord, used: set[str]) -> None:
        """A seeded call's step in its own waste account, priced by the cost models (not by its clock): the step
        as the verification cost prices it plus the predicted drafting of every speculator asked, and that
        drafting as waste where its drafts went unused. A fresh engine's seeded call (a benchmark) would otherwise
        draft with a costly head at every step, unused, until the call ends."""
        n = record.num_rows
        if n <= 0:
            return
        planned_n, step_s = self._plan_step_s  # [K+1] as plan() priced this step (unchanged within a seeded call)
        if planned_n != n:
            step_s = self._step_cost(n)
        for key in list(self._call_wasted_s):
            self._call_wasted_s[key] *= self._decay
        spent = float(step_s[min(max(record.query_len, 1), len(step_s)) - 1])
        for name in record.proposals:
            draft_s = self._draft_s(name, n, self._asked.get(name, self.num_speculative_tokens), step_s)
            spent += draft_s
            if name not in used:
                key = (name, self._greedy, _row_bucket(n))
                self._call_wasted_s[key] = self._call_wasted_s.get(key, 0.0) + draft_s
        self._call_recent_s = self._decay * self._call_recent_s + spent

    def _charge_realised(self, record: StepRecord, used: set[str], update_s: float, unused_s: float) -> None:
        """What a step that verified drafts realised against plain decoding of the same tokens (a plain step of
        its rows as the cost model prices it): a loss is charged to its speculators' waste in the regime, a gain
        credited (the credit capped at the exploration budget), so predictions that the measured step times do
        not bear out (a wrong cost table, costs outside it) stop asking a costly speculator where it lost."""
        if not used or record.query_len <= 1 or record.num_rows <= 0:
            return
        cost = self._cost()
        plain_s = float(cost.step_curve(record.num_rows, 1)[0])  # [s] a plain step
        loss = record.step_s + update_s - unused_s - plain_s * record.num_emitted / record.num_rows
        floor = -self.config.exploration_budget * self._recent_s
        for name in used:
            key = (name, self._greedy, _row_bucket(record.num_rows))
            self._wasted_s[key] = max(floor, self._wasted_s.get(key, 0.0) + loss / len(used))

    def finish(self, stats: SpecStats) -> None:
        """End of a call: apply its remaining timings to the cost models (they shape the next call's decisions),
        hand its predicted-vs-realised acceptance to ``stats``; drafts still pending are censored."""
        if self._timings:
            self._apply_timings()
        self.acceptance.decay(self._greedy, self._pending_decays)
        self._pending_decays = 0
        self._call_wasted_s, self._call_recent_s = {}, 0.0  # the measured timings replace the call's estimates
        self._rng = np.random.default_rng(self.config.seed)  # every call plans from the same random stream
        self._plans = 0  # and probes its cheap speculators on the same schedule
        self._declined = {}
        self._declined_cheap = set()
        seconds, plans = self._call_plan
        if plans:
            mean = seconds / plans
            self._plan_cost_s = mean if self._plan_cost_s <= 0.0 else 0.5 * (self._plan_cost_s + mean)
        self._call_plan = [0.0, 0]
        for name, cal in self._call_calibration.items():
            stats.speculator(name).merge(SpeculatorStats(calibration=cal.tolist()))
        self._call_calibration = {}
        self._tracker.clear()
        self._soft = {}
