"""Online model of each speculator's drafting cost, learned from the engine's own ``propose`` timings.

``seconds ~= a + b * depth + c * tokens`` for one ``propose`` call asked for ``tokens`` draft tokens over its
rows, ``depth = tokens / rows`` tokens per row: ``a`` is a per-call overhead, ``b`` the sequential cost of one
more draft position (a draft head runs one small forward per position), ``c`` the per-token work (an index
lookup, a row of a forward). Fit by exponentially weighted ridge least squares over the last 128 calls,
coefficients kept non-negative. A speculator never observed is predicted free: the first call measures it.

(It was recursive least squares with forgetting: forgetting divides the covariance by the factor at every update,
so along a direction the observations never excite — a rollout asks the same depth of the same rows step after
step — it grew without bound, and the next, noisy, different call threw the coefficients to ~1e14 s per call: the
controller never asked that speculator again. Found in the adapt bench, 2026-12-01.)
"""

from __future__ import annotations

from collections import deque

import numpy as np

from atlas_rl.types import ProposeRecord


class _WindowFit:
    """Exponentially weighted ridge least squares over the last ``window`` calls on 3 features, coefficients
    non-negative (active set: a negative coefficient is pinned to 0 and the rest refitted)."""

    def __init__(self, forgetting: float, window: int = 128) -> None:
        self.theta = np.zeros(3)
        self.lam = forgetting
        self._x: deque[np.ndarray] = deque(maxlen=window)
        self._y: deque[float] = deque(maxlen=window)
        self.n = 0

    @staticmethod
    def features(depth: float, tokens: float) -> np.ndarray:
        return np.array([1.0, depth, tokens / 64.0])

    def update(self, x: np.ndarray, y: float) -> None:
        self._x.append(x)
        self._y.append(float(y))
        self.n += 1
        X, Y = np.array(self._x), np.array(self._y)  # [N, 3], [N]
        w = self.lam ** np.arange(len(Y))[::-1]  # [N] the newest weighs 1
        free = np.ones(3, dtype=bool)
        theta = np.zeros(3)
        for _ in range(3):
            Xf = X[:, free]
            A = (Xf * w[:, None]).T @ Xf + 1e-6 * float(w.sum()) * np.eye(int(free.sum()))
            theta = np.zeros(3)
            theta[free] = np.linalg.solve(A, (Xf * w[:, None]).T @ Y)
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
        self._models: dict[str, _WindowFit] = {}

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
        m = self._models.setdefault(name, _WindowFit(self.forgetting))
        m.update(m.features(rec.tokens / rec.rows, rec.tokens), rec.seconds)
