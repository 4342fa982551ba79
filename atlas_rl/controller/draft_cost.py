"""Online model of each speculator's drafting cost, learned from the engine's own ``propose`` timings.

``seconds ~= a + b * depth + c * tokens`` for one ``propose`` call asked for ``tokens`` draft tokens over its
rows, ``depth = tokens / rows`` tokens per row: ``a`` is a per-call overhead, ``b`` the sequential cost of one
more draft position (a draft head runs one small forward per position), ``c`` the per-token work (an index
lookup, a row of a forward). Fit by exponentially weighted ridge least squares (forgetting factor per call),
coefficients kept non-negative. A speculator never observed is predicted free: the first call measures it.

(It was recursive least squares with forgetting: forgetting divides the covariance by the factor at every update,
so along a direction the observations never excite — a rollout asks the same depth of the same rows step after
step — it grew without bound, and the next, noisy, different call threw the coefficients to ~1e14 s per call: the
controller never asked that speculator again. Found in the adapt bench, 2026-12-01.)
"""

from __future__ import annotations

import numpy as np

from atlas_rl.types import ProposeRecord


class _WeightedFit:
    """Exponentially weighted ridge least squares on 3 features, coefficients non-negative (active set: a negative
    coefficient is pinned to 0 and the rest refitted). O(1) per call: the weighted normal equations are kept as
    running sums (the engine calls this every step), and solved once per new observation (3 x 3)."""

    def __init__(self, forgetting: float) -> None:
        self.theta = np.zeros(3)
        self.lam = forgetting
        self._xx = np.zeros((3, 3))  # sum_i w_i x_i x_i^T
        self._xy = np.zeros(3)  # sum_i w_i x_i y_i
        self._w = 0.0  # sum_i w_i
        self.n = 0

    @staticmethod
    def features(depth: float, tokens: float) -> np.ndarray:
        return np.array([1.0, depth, tokens / 64.0])

    def update(self, x: np.ndarray, y: float) -> None:
        lam = self.lam
        self._xx = lam * self._xx + np.outer(x, x)
        self._xy = lam * self._xy + x * float(y)
        self._w = lam * self._w + 1.0
        self.n += 1
        free = np.ones(3, dtype=bool)
        theta = np.zeros(3)
        for _ in range(3):
            idx = np.flatnonzero(free)
            A = self._xx[np.ix_(idx, idx)] + 1e-6 * self._w * np.eye(len(idx))
            theta = np.zeros(3)
            theta[idx] = np.linalg.solve(A, self._xy[idx])
            if (theta >= 0).all():
                break
            free &= theta > 0
        self.theta = np.maximum(theta, 0.0)


class DraftCost:
    """Per-speculator drafting cost, refined after every step from ``StepRecord.proposals``.

    Args:
        forgetting: RLS forgetting factor in (0, 1]; lower adapts faster to a changed cost.
    """

    def __init__(self, forgetting: float = 0.97) -> None:
        if not (0.0 < forgetting <= 1.0):
            raise ValueError(f"forgetting must lie in (0, 1], got {forgetting}")
        self.forgetting = forgetting
        self._models: dict[str, _WeightedFit] = {}

    def predict(self, name: str, rows: int, depth: int) -> float:
        """Seconds of one ``propose`` call for ``rows`` rows asked for ``depth`` tokens each (0 if never seen)."""
        m = self._models.get(name)
        if m is None or rows <= 0 or depth <= 0:
            return 0.0
        return max(0.0, float(m.features(depth, rows * depth) @ m.theta))

    def predict_curve(self, name: str, rows: int, max_depth: int) -> np.ndarray:
        """``[max_depth]`` :meth:`predict` for depth = 1 .. ``max_depth`` at once."""
        m = self._models.get(name)
        if m is None or rows <= 0:
            return np.zeros(max(max_depth, 0))
        depth = np.arange(1, max_depth + 1, dtype=float)
        x = np.stack([np.ones_like(depth), depth, rows * depth / 64.0], 1)  # [max_depth, 3] = features per depth
        return np.maximum(x @ m.theta, 0.0)

    def observations(self, name: str) -> int:
        m = self._models.get(name)
        return 0 if m is None else m.n

    def observe(self, name: str, rec: ProposeRecord) -> None:
        if rec.rows <= 0 or rec.seconds < 0:
            return
        m = self._models.setdefault(name, _WeightedFit(self.forgetting))
        m.update(m.features(rec.tokens / rec.rows, rec.tokens), rec.seconds)
