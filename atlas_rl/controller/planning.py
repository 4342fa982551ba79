"""The arithmetic of a speculative step: expected emitted tokens per row and the draft length that maximises
emitted tokens per second of the whole batch.

A row whose draft tokens are accepted with (conditional) probabilities ``a_1 .. a_q`` emits in expectation
``1 + sum_i prod_{l <= i} a_l`` tokens (the recovered/bonus token always comes). One forward verifies every row,
padded to the longest draft, so a step with longest draft ``q`` costs ``cost[q]`` whatever the other rows draft:
each row then uses ``min(its draft, q)`` tokens, and the best ``q`` maximises ``effective(q) / cost[q]``.

Why not simply ``sum_rows E_row(q)``: a batch is done when its *longest* row is. Write the cost of a plain step
of ``n`` rows as ``fixed + per_row * n`` (a chord of the measured table: ``fixed`` is what a step costs whatever
its rows, ``per_row`` what each active row adds). An extra token of row i saves that row one step, which saves
``per_row`` once the row ends earlier; it saves ``fixed`` only when *every* row gets ahead — the steps of the
batch are set by its slowest row. So a step at length q saves, in expectation,
``V(q) = fixed * (min_i E_i(q) - 1) + per_row * sum_i (E_i(q) - 1)`` seconds of future plain steps (the min
over the rows that can still be the slowest: those furthest from their token budget), and it is
worth ``effective(q) = n * (1 + V(q) / base)`` tokens at the plain rate ``n / base``. With one row this is
``E(q)``; on a compute-bound device (``fixed`` small) it is the sum of the rows' gains priced at their marginal
cost; on a memory-bound one (``per_row`` small) it is the gain of the slowest row: extra tokens of rows that
already run ahead do not shorten the batch.
"""

from __future__ import annotations

import numpy as np


def expected_tokens(acc: np.ndarray) -> np.ndarray:
    """``acc [..., K]`` per-token acceptance (0 past the end of a draft) -> ``[..., K+1]``: expected tokens
    emitted when the draft is cut to ``q = 0 .. K`` tokens."""
    surv = np.cumprod(acc, axis=-1)  # [..., K] probability that tokens 0..j are all accepted
    out = np.ones((*acc.shape[:-1], acc.shape[-1] + 1))
    out[..., 1:] += np.cumsum(surv, axis=-1)
    return out


def step_cost_split(base_n: float, base_1: float, n: int) -> tuple[float, float]:
    """``(fixed, per_row)`` seconds: the chord ``fixed + per_row * r`` through the plain-step costs of 1 row
    (``base_1``) and of ``n`` rows (``base_n``), both non-negative; one row is all ``fixed``."""
    if n <= 1:
        return base_n, 0.0
    per_row = max(0.0, (base_n - base_1) / (n - 1))
    fixed = max(0.0, base_n - per_row * n)
    return fixed, per_row


def effective_tokens(
    total: np.ndarray,  # [..., K+1] sum over rows of expected tokens at q = 0 .. K
    slowest: np.ndarray,  # [..., K+1] expected tokens of the slowest row (min over rows)
    n: int,
    fixed_s: float,
    per_row_s: float,
) -> np.ndarray:
    """``[..., K+1]`` tokens at the plain rate that a step at length q is worth (module docstring)."""
    base = fixed_s + per_row_s * n
    if n <= 0 or base <= 0:
        return np.asarray(total, dtype=float)
    saved = fixed_s * (slowest - 1.0) + per_row_s * (total - n)
    return n * (1.0 + saved / base)


def best_length(total: np.ndarray, step_s: np.ndarray, margin: float) -> tuple[int, np.ndarray]:
    """``total [K+1]`` expected tokens of the batch and ``step_s [K+1]`` seconds of the step when the longest
    draft has ``q`` tokens -> (best q, rates [K+1] in tokens/s). q > 0 only when it beats q = 0 by ``margin``
    (a relative safety margin against estimation error: speculation must pay clearly to be used)."""
    rates = total / step_s
    q = int(np.argmax(rates))
    if q > 0 and rates[q] < rates[0] * (1.0 + margin):
        q = 0
    return q, rates
