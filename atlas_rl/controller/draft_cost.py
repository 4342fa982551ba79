"""Online model of each speculator's drafting cost, learned from the engine's own ``propose`` timings.

``seconds ~= a + b * depth + c * tokens`` for one ``propose`` call asked for ``tokens`` draft tokens over its
rows, ``depth = tokens / rows`` tokens per row: ``a`` is a per-call overhead, ``b`` the sequential cost of one
more draft position (a draft head runs one small forward per position), ``c`` the per-token work (an index
lookup, a row of a forward). Fit by recursive least squares with forgetting, coefficients kept non-negative.
A speculator never observed is predicted free: the first call measures it.
"""

from __future__ import annotations

import numpy as np

from atlas_rl.types import ProposeRecord


class _RLS:
    """Recursive least squares with exponential forgetting on 3 features, coefficients projected to >= 0."""

    def __init__(self, forgetting: float) -> None:
        self.theta = np.zeros(3)
        self.P = np.eye(3) * 1e2
        self.lam = forgetting
        self.n = 0

    @staticmethod
    def features(depth: float, tokens: float) -> np.ndarray:
        return np.array([1.0, depth, tokens / 64.0])

    def update(self, x: np.ndarray, y: float) -> None:
        Px = self.P @ x
        g = Px / (self.lam + x @ Px)
        self.theta = np.maximum(self.theta + g * (y - x @ self.theta), 0.0)
        self.P = (self.P - np.outer(g, Px)) / self.lam
        self.n += 1


class DraftCost:
    """Per-speculator drafting cost, refined after every step from ``StepRecord.proposals``.

    Args:
        forgetting: RLS forgetting factor in (0, 1]; lower adapts faster to a changed cost.
    """

    def __init__(self, forgetting: float = 0.97) -> None:
        if not (0.0 < forgetting <= 1.0):
            raise ValueError(f"forgetting must lie in (0, 1], got {forgetting}")
        self.forgetting = forgetting
        self._models: dict[str, _RLS] = {}

    def predict(self, name: str, rows: int, depth: int) -> float:
        """Seconds of one ``propose`` call for ``rows`` rows asked for ``depth`` tokens each (0 if never seen)."""
        m = self._models.get(name)
        if m is None or rows <= 0 or depth <= 0:
            return 0.0
        return max(0.0, float(m.features(depth, rows * depth) @ m.theta))

    def observations(self, name: str) -> int:
        m = self._models.get(name)
        return 0 if m is None else m.n

    def observe(self, name: str, rec: ProposeRecord) -> None:
        if rec.rows <= 0 or rec.seconds < 0:
            return
        m = self._models.setdefault(name, _RLS(self.forgetting))
        m.update(m.features(rec.tokens / rec.rows, rec.tokens), rec.seconds)
