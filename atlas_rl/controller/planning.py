"""The arithmetic of a speculative step: expected emitted tokens per row and the draft length that maximises
emitted tokens per second of the whole batch.

A row whose draft tokens are accepted with (conditional) probabilities ``a_1 .. a_q`` emits in expectation
``1 + sum_i prod_{l <= i} a_l`` tokens (the recovered/bonus token always comes). One forward verifies every row,
padded to the longest draft, so a step with longest draft ``q`` costs ``cost[q]`` whatever the other rows draft:
each row then uses ``min(its draft, q)`` tokens, and the best ``q`` maximises ``sum_rows E_row(q) / cost[q]``.
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


def best_length(total: np.ndarray, step_s: np.ndarray, margin: float) -> tuple[int, np.ndarray]:
    """``total [K+1]`` expected tokens of the batch and ``step_s [K+1]`` seconds of the step when the longest
    draft has ``q`` tokens -> (best q, rates [K+1] in tokens/s). q > 0 only when it beats q = 0 by ``margin``
    (a relative safety margin against estimation error: speculation must pay clearly to be used)."""
    rates = total / step_s
    q = int(np.argmax(rates))
    if q > 0 and rates[q] < rates[0] * (1.0 + margin):
        q = 0
    return q, rates
