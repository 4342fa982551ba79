"""Confidence calibration: what a speculator's ``Draft.confidence`` means in accepted tokens, learned online.

For every speculator and sampling mode (greedy / sampled) the model keeps exponentially decayed Beta counts of
accepted and observed draft tokens over a grid of (draft position group, confidence bin). Token ``j`` of a draft
is *observed* when every token before it was accepted; it is then accepted or rejected. Tokens after the first
rejection are censored (never counted).

Estimates shrink hierarchically, so that a cell with little data borrows from its parents::

    speculator:  m_s  = (A_long + k * prior_mean) / (N_long + k)
    position g:  m_g  = (A_g + k * m_s) / (N_g + k)
    cell (g, b): m_gb = (A_gb + k * m_g) / (N_gb + k)

with ``k = prior_strength`` pseudo-observations at each level. Cell counts decay with a half-life of
``half_life_steps`` decode steps (recent evidence tracks a drifting speculator); the speculator level keeps a
ten times longer memory, so a speculator not observed for a while falls back to its own long-run acceptance,
not to the optimistic ``prior_mean``. An optimistic variant adds ``beta`` posterior standard deviations
(``sqrt(m (1 - m) / (N + k + 1))``, from the decayed cell counts): the planner uses it, so a speculator with
little or stale evidence still gets asked now and then (exploration). A pessimistic variant subtracts
``beta_low`` of them: the choice of what to verify uses it, so that estimates resting on a handful of tokens
(which the maximisation over draft lengths would otherwise pick for their luck) do not make a step slower.

Drift detection: every table keeps a fast (half-life ``DRIFT_HALF_LIFE`` steps) sum of ``outcome - predicted``
over the tokens it observed, standardised by ``sqrt(sum p (1 - p) + 1)``. Past ``drift_z`` standard deviations
the predictions are off for real (the speculator or the policy changed): the cell counts are halved, so the new
regime takes over within a few steps instead of a half-life.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONFIDENCE_EDGES = np.array([0.0, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95])  # lower edges of the confidence bins
NUM_BINS = len(CONFIDENCE_EDGES)
DRIFT_HALF_LIFE = 5.0  # steps
LONG_MEMORY = 10.0  # the speculator level's half-life, in cell half-lives


def confidence_bins(confidence: np.ndarray) -> np.ndarray:
    """Bin index (0 .. NUM_BINS-1) of each confidence value (values outside [0, 1] are clipped)."""
    # minimum/maximum, not np.clip: its dtype checks were ~10 us a call, 4% of the controller's time a step
    return np.minimum(np.maximum(np.searchsorted(CONFIDENCE_EDGES, confidence, side="right") - 1, 0), NUM_BINS - 1)


def position_groups(max_k: int) -> np.ndarray:
    """``[max_k]`` group of each draft position: 0, 1, 2, 3 alone, then pairs of halves of each octave
    (4-5, 6-7, 8-11, 12-15, 16-23, ...), so that far positions, observed rarely, pool their data."""
    out = np.empty(max_k, dtype=np.int64)
    for j in range(max_k):
        if j < 4:
            out[j] = j
        else:
            e = j.bit_length() - 1
            out[j] = 4 + 2 * (e - 2) + ((j >> (e - 1)) & 1)
    return out


@dataclass
class Estimates:
    """Per-position acceptance estimates of one speculator in one mode (positions 0 .. max_k-1)."""

    mean: np.ndarray  # [max_k, NUM_BINS] calibrated acceptance of a token at position j with confidence bin b
    optimistic: np.ndarray  # [max_k, NUM_BINS] the same + beta standard deviations (capped at 1)
    pessimistic: np.ndarray  # [max_k, NUM_BINS] the same - beta_low standard deviations (at least 0)
    marginal: np.ndarray  # [max_k] position-level acceptance, any confidence
    marginal_optimistic: np.ndarray  # [max_k]


class _Counts:
    def __init__(self, groups: int, prior: float, strength: float) -> None:
        self.prior = prior  # acceptance assumed before evidence (the model's prior_mean or the speculator's own)
        self.strength = strength  # pseudo-observations behind it (at every level of the hierarchy)
        self.acc = np.zeros((groups, NUM_BINS))  # [G, B] decayed accepted counts
        self.tot = np.zeros((groups, NUM_BINS))  # [G, B] decayed observed counts
        self.long_acc = 0.0  # speculator level, long memory
        self.long_tot = 0.0
        self.resid = 0.0  # fast sum of (outcome - predicted)
        self.var = 0.0  # fast sum of predicted * (1 - predicted)
        self.drifts = 0
        self.cache: Estimates | None = None


class AcceptanceModel:
    """Calibrated per-token acceptance of every speculator, per draft position and confidence bin.

    Args:
        max_k: longest draft.
        prior_mean: acceptance assumed for a speculator never observed (optimistic but bounded).
        prior_strength: pseudo-observations of each level's prior.
        half_life_steps: decode steps after which evidence weighs half.
        beta: posterior standard deviations added by the optimistic estimates.
        beta_low: posterior standard deviations subtracted by the pessimistic estimates.
        drift_z: standardised prediction error that declares a drift (halves the evidence); inf disables it.
    """

    def __init__(
        self,
        max_k: int,
        prior_mean: float = 0.5,
        prior_strength: float = 2.0,
        half_life_steps: float = 50.0,
        beta: float = 1.0,
        beta_low: float = 1.0,
        drift_z: float = 4.0,
    ) -> None:
        self.max_k = max_k
        self.prior_mean = prior_mean
        self.prior_strength = prior_strength
        self.decay_factor = 0.5 ** (1.0 / half_life_steps)
        self.long_decay_factor = 0.5 ** (1.0 / (LONG_MEMORY * half_life_steps))
        self.fast_decay_factor = 0.5 ** (1.0 / DRIFT_HALF_LIFE)
        self.beta = beta
        self.beta_low = beta_low
        self.drift_z = drift_z
        self.groups = position_groups(max_k)
        self.num_groups = int(self.groups.max()) + 1 if max_k else 1
        self._tables: dict[tuple[str, bool], _Counts] = {}
        self._priors: dict[str, tuple[float, float]] = {}

    def set_prior(self, name: str, mean: float, strength: float | None = None) -> None:
        """Acceptance to assume for ``name`` before evidence, in place of ``prior_mean`` (e.g. the held-out
        acceptance on a draft head's card), worth ``strength`` pseudo-observations (default ``prior_strength``):
        a speculator measured to be weak is then not explored at a loss."""
        if not (0.0 < mean < 1.0):
            raise ValueError(f"prior acceptance of {name!r} must lie in (0, 1), got {mean!r}")
        k = self.prior_strength if strength is None else float(strength)
        if not (k > 0):
            raise ValueError(f"prior strength of {name!r} must be > 0, got {strength!r}")
        self._priors[name] = (float(mean), k)
        for (n, _), t in self._tables.items():
            if n == name:
                t.prior, t.strength = float(mean), k
                t.cache = None

    def _table(self, name: str, greedy: bool) -> _Counts:
        key = (name, greedy)
        if key not in self._tables:
            prior, strength = self._priors.get(name, (self.prior_mean, self.prior_strength))
            self._tables[key] = _Counts(self.num_groups, prior, strength)
        return self._tables[key]

    def has_prior(self, name: str) -> bool:
        """Whether ``name`` started from its own (informed) prior rather than the generic ``prior_mean``."""
        return name in self._priors

    def drift_events(self, name: str, greedy: bool) -> int:
        """How many times a drift was detected for ``name`` (its evidence halved)."""
        t = self._tables.get((name, greedy))
        return 0 if t is None else t.drifts

    def observed_tokens(self, name: str, greedy: bool) -> float:
        """Decayed count of observed draft tokens of ``name`` (how much evidence the estimates rest on)."""
        t = self._tables.get((name, greedy))
        return 0.0 if t is None else float(t.tot.sum())

    def decay(self, greedy: bool, steps: int = 1) -> None:
        """``steps`` steps passed: every table of this mode loses weight (also those of speculators not used)."""
        if steps <= 0:
            return
        f, f_long, f_fast = self.decay_factor**steps, self.long_decay_factor**steps, self.fast_decay_factor**steps
        for (_, g), t in self._tables.items():
            if g == greedy:
                t.acc *= f
                t.tot *= f
                t.long_acc *= f_long
                t.long_tot *= f_long
                t.resid *= f_fast
                t.var *= f_fast
                t.cache = None

    def observe(
        self,
        name: str,
        greedy: bool,
        positions: np.ndarray,  # [m] draft positions (0-based)
        bins: np.ndarray,  # [m] confidence bins
        accepted: np.ndarray,  # [m] 1.0 accepted / 0.0 rejected
        predicted: np.ndarray | None = None,  # [m] acceptance predicted for these tokens (drift detection)
    ) -> None:
        if len(positions) == 0:
            return
        t = self._table(name, greedy)
        g = self.groups[np.minimum(positions, self.max_k - 1)]
        if predicted is not None:
            t.resid += float((accepted - predicted).sum())
            t.var += float((predicted * (1 - predicted)).sum())
            if abs(t.resid) > self.drift_z * np.sqrt(t.var + 1.0):
                t.acc *= 0.5
                t.tot *= 0.5
                t.resid = t.var = 0.0
                t.drifts += 1
        np.add.at(t.tot, (g, bins), 1.0)
        np.add.at(t.acc, (g, bins), accepted)
        t.long_acc += float(accepted.sum())
        t.long_tot += float(len(accepted))
        t.cache = None

    def estimates(self, name: str, greedy: bool) -> Estimates:
        t = self._table(name, greedy)
        if t.cache is None:
            t.cache = self._compute(t)
        return t.cache

    def _compute(self, t: _Counts) -> Estimates:
        k, beta = t.strength, self.beta
        m_s = (t.long_acc + k * t.prior) / (t.long_tot + k)
        acc_g, tot_g = t.acc.sum(1), t.tot.sum(1)  # [G]
        m_g = (acc_g + k * m_s) / (tot_g + k)  # [G]
        m_gb = (t.acc + k * m_g[:, None]) / (t.tot + k)  # [G, B]
        ucb_g = np.minimum(1.0, m_g + beta * np.sqrt(m_g * (1 - m_g) / (tot_g + k + 1)))
        sd_gb = np.sqrt(m_gb * (1 - m_gb) / (t.tot + k + 1))
        ucb_gb = np.minimum(1.0, m_gb + beta * sd_gb)
        lcb_gb = np.maximum(0.0, m_gb - self.beta_low * sd_gb)
        g = self.groups
        return Estimates(
            mean=m_gb[g], optimistic=ucb_gb[g], pessimistic=lcb_gb[g], marginal=m_g[g], marginal_optimistic=ucb_g[g]
        )
